"""Bad LoRA adapter experts: each refused by name at the CLI (exit 2, the adapter file and the
tensor or module named), with nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from esm_ray.cli import main


def _spec(base: Path, experts: list[Path], out: Path) -> dict:
    return {"base": str(base), "experts": [{"name": f"e{i}", "model": str(e)} for i, e in enumerate(experts)],
            "method": {"name": "task_arithmetic"}, "output": str(out), "runtime": {"name": "local"}}


def _broken(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(cfg | (config or {})))
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(sd) if tensors else sd, str(dst / "adapter_model.safetensors"))
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
BAD = {
    "loha": ({"peft_type": "LOHA"}, None, r"adapter_config\.json: peft_type 'LOHA' is not supported"),
    "dora": ({"use_dora": True}, None, r"adapter_config\.json: DoRA \(use_dora: true\)"),
    "rank": ({"r": 8}, None, r"adapter_model\.safetensors: tensor 'base_model\.model\.[a-z_.0-9]+\.lora_A\.weight' has rank 2 .*r = 8"),
    "missing_target": (None, lambda sd: {k.replace("q_proj", "qq_proj"): v for k, v in sd.items()},
                       r"updates 'model\.layers\.0\.self_attn\.qq_proj\.weight', which the base .* does not have"),
    "missing_b": (None, lambda sd: {k: v for k, v in sd.items() if k != f"{Q0}.lora_B.weight"},
                  rf"tensor '{Q0}\.lora_A\.weight' has no matching .*lora_B\.weight"),
    "shape": (None, lambda sd: sd | {f"{Q0}.lora_A.weight": torch.zeros(2, 48)},
              r"has shape \(32, 48\), the base's 'model\.layers\.0\.self_attn\.q_proj\.weight' has \(32, 32\)"),
    "missing_module": (None, lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.v_proj" not in k},
                       r"adapter_model\.safetensors: holds no LoRA factors for "
                       r"'model\.layers\.1\.self_attn\.v_proj', which .*adapter_config\.json names \('v_proj'\)"),
    "missing_saved": ({"modules_to_save": ["lm_head"]}, None,
                      r"holds no weights for 'lm_head', which .*adapter_config\.json names \('lm_head'\)"),
    "dora_tensor": (None, lambda sd: sd | {f"{Q0}.lora_magnitude_vector": torch.ones(32)},
                    r"lora_magnitude_vector' is a DoRA magnitude vector"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_by_name_and_nothing_written(case, lora_family, tmp_path, capsys):
    config, tensors, message = BAD[case]
    bad = _broken(lora_family["lora_0"], tmp_path / "bad", config, tensors)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(_spec(lora_family["base"], [lora_family["lora_1"], bad], tmp_path / "out")))
    assert main(["merge", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
