"""`model.compile()` (torch.compile, Inductor) gives the eager model's images. Slow (about 35 s of compiling on
a 2-core CPU), so it runs with `-m slow`.

Inductor fuses element-wise work into generated C++ loops and may reorder float sums, so the compiled UNet's
outputs differ from eager ones in their last bits (~1e-7 relative in fp32). Measured: 2e-6 in [0, 1] pixels after
2 steps of the tiny model (AVX512, 2026-12-01). The bound, 1e-4, is 50 times that for other CPUs' vector widths and
still far below what a wrong kernel gives (a dropped residual or norm moves pixels by tenths).
"""

from __future__ import annotations

import pytest

import sdtorch

pytestmark = pytest.mark.slow


def test_compiled_unet_gives_the_eager_images():
    model = sdtorch.build("tiny")
    kw = dict(steps=2, seed=1, batch_size=2, output_type="tensor")
    eager = model.txt2img("a red circle", **kw)
    unet = model.unet
    assert model.compile() is model and model.unet is unet, "compiled in place: the same module and weights"
    compiled = model.txt2img("a red circle", **kw)
    assert (compiled - eager).abs().max() <= 1e-4
    assert set(model.unet.state_dict()) == set(sdtorch.build("tiny").unet.state_dict()), "keys unchanged"
