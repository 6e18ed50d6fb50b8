"""cluster/serve-llm.yaml: the Ray Serve LLM (vLLM, multi-LoRA) config with esm-ray's router in
front, built and validated without a GPU. vLLM is not installed here, so `ray.serve.llm` itself
does not import: the LLM configs are checked with the pydantic models it validates them with
(ray.llm's LLMConfig), and the whole file with Ray Serve's deploy schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "serve-llm.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _apps(cfg: dict) -> dict[str, dict]:
    return {a["import_path"]: a for a in cfg["applications"]}


def test_the_file_is_a_valid_serve_deploy_config(cfg):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cfg)
    assert sorted(a.route_prefix for a in schema.applications) == ["/", "/llm"]


def test_the_llm_configs_validate_and_serve_the_adapters_directory(cfg):
    llm_config = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config")
    app = _apps(cfg)["ray.serve.llm:build_openai_app"]
    assert set(app["args"]) <= {"llm_configs", "ingress_deployment_config", "ingress_cls_config"}
    (raw,) = app["args"]["llm_configs"]
    c = llm_config.LLMConfig.model_validate(raw)
    source = raw["model_loading_config"]["model_source"]["bucket_uri"].rstrip("/")
    assert c.lora_config.dynamic_lora_loading_path == f"{source}/adapters"  # adapters/<task>/ of the routed dir
    assert c.engine_kwargs["enable_lora"] is True and c.engine_kwargs["max_lora_rank"] >= 8
    assert c.lora_config.max_num_adapters_per_replica >= c.engine_kwargs["max_loras"]
    with pytest.raises(Exception, match="s3://|dynamic_lora_loading_path"):  # the schema check is real
        llm_config.LLMConfig.model_validate({**raw, "lora_config": {"dynamic_lora_loading_path": "/local/x"}})


def test_the_front_builds_and_points_at_the_engine(cfg):
    from ray.serve.deployment import Application

    from esm_ray.serve.llm_front import FrontOptions, app_builder

    apps = _apps(cfg)
    front, llm = apps["esm_ray.serve.llm_front:app_builder"], apps["ray.serve.llm:build_openai_app"]
    app = app_builder(front["args"])
    assert isinstance(app, Application) and app._bound_deployment.name == "RouterFront"
    opts = FrontOptions.model_validate(app._bound_deployment.init_args[0])
    model = llm["args"]["llm_configs"][0]["model_loading_config"]
    assert opts.base_model_id == model["model_id"]
    assert opts.model_dir.rstrip("/") == model["model_source"]["bucket_uri"].rstrip("/")
    assert opts.upstream.endswith(llm["route_prefix"]) and front["route_prefix"] == "/"
    with pytest.raises(Exception, match="upstreem|extra"):
        app_builder({**front["args"], "upstreem": "x"})
