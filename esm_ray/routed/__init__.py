"""The routed model: merged base + per-sample low-rank residual experts + router, save/load;
for causal LMs, RoutedLM: PEFT adapters with per-sequence routing for generation."""

from esm_ray.routed.build import build_routed, routed_modules
from esm_ray.routed.layers import RoutedLinear, RoutingState
from esm_ray.routed.load import head_from, load_routed, read_head
from esm_ray.routed.lm import RoutedLM, load_routed_lm
from esm_ray.routed.model import Classified, Head, RoutedModel, RoutedOutput, SimRouter

__all__ = ["Classified", "Head", "RoutedLinear", "RoutedLM", "RoutedModel", "RoutedOutput", "RoutingState", "SimRouter",
           "build_routed", "head_from", "load_routed", "load_routed_lm", "read_head", "routed_modules"]
