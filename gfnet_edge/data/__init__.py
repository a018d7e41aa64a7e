"""Data for gfnet-edge: the cluttered-digits demo task and a generic image loader."""
from gfnet_edge.data.cluttered_digits import (
    ClutteredDigits,
    ClutteredDigitsConfig,
    config_from_dict,
    demo_config,
    digit_crops,
    load_digit_source,
    normalize,
    render_sample,
    split_pool,
)
from gfnet_edge.data.images import iter_image_batches, load_images

__all__ = [
    "ClutteredDigits",
    "ClutteredDigitsConfig",
    "config_from_dict",
    "demo_config",
    "digit_crops",
    "iter_image_batches",
    "load_digit_source",
    "load_images",
    "normalize",
    "render_sample",
    "split_pool",
]
