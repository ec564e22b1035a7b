"""OpenVINO reference for the speed benchmarks (benchmark-only dependency: `pip install openvino`).

The diffusers UNet / VAE decoder are converted with `openvino.convert_model` at the shapes of the
example inputs (static shapes) and compiled for the CPU with a given inference precision and with
as many threads as torch uses, so that "sdtorch / OpenVINO" compares like with like.

    import openvino_ref                    # from a script in benchmarks/ (its folder is on sys.path)
    if openvino_ref.available():
        run = openvino_ref.unet(diffusers_unet, x, t, ctx, precision="bf16")
        eps = run(x, t, ctx)               # float32 torch.Tensor

    python benchmarks/openvino_ref.py      # self-check on a tiny random diffusers UNet and VAE
"""

from __future__ import annotations

import time

import torch

PRECISIONS = {"bf16": "bf16", "f32": "f32"}


def available() -> bool:
    """True when openvino can be imported (a benchmark prints a note and skips its rows otherwise)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class _UNetSample(torch.nn.Module):
    """diffusers' UNet returns a dataclass; tracing wants a plain tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


class _VAEDecode(torch.nn.Module):
    """`vae.decode(z).sample` as a module."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def _compile(module: torch.nn.Module, example: tuple[torch.Tensor, ...], precision: str):
    """Convert `module` at the shapes of `example` and compile it for the CPU; returns a callable."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    example = tuple(t.float() for t in example)
    with torch.no_grad():
        model = ov.convert_model(module.eval(), example_input=example)
    # static shapes: the benchmark shapes only
    model.reshape({port: ov.PartialShape(list(t.shape)) for port, t in zip(model.inputs, example)})
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        arrays = [t.detach().float().contiguous().numpy() for t in inputs]
        result = request.infer(arrays)
        return torch.from_numpy(result[compiled.output(0)].copy()).float()

    run.compiled = compiled  # e.g. run.compiled.get_property("INFERENCE_PRECISION_HINT")
    return run


def unet(diffusers_unet, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
         precision: str = "bf16"):
    """A diffusers UNet2DConditionModel compiled by OpenVINO: callable(sample, timestep, context)."""
    timestep = torch.as_tensor(timestep, dtype=torch.float32).expand(sample.shape[0])
    run = _compile(_UNetSample(diffusers_unet), (sample, timestep, context), precision)

    def call(sample, timestep, context):
        return run(sample, torch.as_tensor(timestep, dtype=torch.float32).expand(sample.shape[0]), context)

    call.compiled = run.compiled
    return call


def vae_decoder(diffusers_vae, latents: torch.Tensor, precision: str = "bf16"):
    """A diffusers AutoencoderKL's `decode(z).sample` compiled by OpenVINO: callable(latents)."""
    return _compile(_VAEDecode(diffusers_vae), (latents,), precision)


def converted(make_reference, convert, *example, skip: bool = False):
    """(callable, conversion seconds) of `convert(reference, *example, precision="bf16")` for the reference model
    `make_reference()` builds (freed once converted), or (None, why) where OpenVINO is skipped or missing."""
    if skip:
        return None, "OpenVINO: skipped (--no-openvino)"
    if not available():
        return None, "OpenVINO: not installed (pip install openvino): skipped"
    reference = make_reference()
    t0 = time.perf_counter()
    run = convert(reference, *example, precision="bf16")
    return run, time.perf_counter() - t0


def _timed(fn, *args, repeats: int = 3):
    """(output, best-of-`repeats` seconds) after one warm-up call."""
    out, best = fn(*args), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


def _self_check() -> None:
    import warnings

    from diffusers import AutoencoderKL, UNet2DConditionModel

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    tiny_unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    tiny_vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=32).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    z = torch.randn(1, 4, 16, 16)

    import openvino as ov

    print(f"openvino {ov.__version__}, torch threads {torch.get_num_threads()}")
    with torch.no_grad():
        want_unet, s = _timed(lambda: tiny_unet(x, t, encoder_hidden_states=ctx).sample)
        print(f"unet  diffusers fp32  {s * 1e3:8.2f} ms")
        want_vae, s = _timed(lambda: tiny_vae.decode(z).sample)
        print(f"vae   diffusers fp32  {s * 1e3:8.2f} ms")
    for precision in ("f32", "bf16"):
        run = unet(tiny_unet, x, t, ctx, precision)
        c = run.compiled
        print(f"      compiled: INFERENCE_PRECISION_HINT={c.get_property('INFERENCE_PRECISION_HINT')}, "
              f"INFERENCE_NUM_THREADS={c.get_property('INFERENCE_NUM_THREADS')}")
        got, s = _timed(run, x, t, ctx)
        print(f"unet  openvino  {precision:4s}  {s * 1e3:8.2f} ms   max|diff| {(got - want_unet).abs().max():.2e}"
              f"   (output max|x| {want_unet.abs().max():.2f})")
        run = vae_decoder(tiny_vae, z, precision)
        got, s = _timed(run, z)
        print(f"vae   openvino  {precision:4s}  {s * 1e3:8.2f} ms   max|diff| {(got - want_vae).abs().max():.2e}"
              f"   (output max|x| {want_vae.abs().max():.2f})")


if __name__ == "__main__":
    _self_check()
