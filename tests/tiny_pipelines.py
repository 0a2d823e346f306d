"""The tiny random pipelines the tests build (``diffalign.testing``), by name (imported by name)."""

from diffalign import testing

BUILDERS = {
    "sd": lambda p: testing.make_tiny_sd(p),
    "sd-v": lambda p: testing.make_tiny_sd(p, prediction_type="v_prediction"),
    "sdxl": lambda p: testing.make_tiny_sdxl(p),
    "sd3": lambda p: testing.make_tiny_sd3(p),
    "sd3-t5": lambda p: testing.make_tiny_sd3(p, with_t5=True),
}
