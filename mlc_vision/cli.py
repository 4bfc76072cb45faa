"""``mlc-vision``: compile, convert, run, inspect, targets, bench.

Every user mistake ends as one line ``error: ...`` on stderr and exit code 1;
heavy imports (TVM, the models) happen inside the commands so ``--help`` is
instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .compiler.targets import ATTENTION
from .config import DTYPES, FEATURES, PROJECTORS
from .errors import MlcVisionError

DTYPE_CHOICE = click.Choice(DTYPES)
FEATURE_CHOICE = click.Choice(FEATURES)
PROJECTOR_CHOICE = click.Choice(("none", *PROJECTORS))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlc-vision")
def cli():
    """Compile Hugging Face vision encoders into TVM libraries, convert their weights, run them."""


# ---- compile -----------------------------------------------------------------------


def default_dtype(target: str) -> str:
    return "float32" if target == "cpu" else "float16"


def default_output(model: str, target: str, suffix: str) -> Path:
    name = Path(model).name if Path(model).exists() else str(model).replace("/", "--")
    return Path("dist") / f"{name}-{target}{suffix}"


@cli.command("compile")
@click.option("--model", "-m", required=True, help="Preset name, checkpoint directory or hub id.")
@click.option("--target", "-t", default="cpu", show_default=True, help="cpu, cuda, vulkan, metal, opencl, webgpu.")
@click.option("--arch", default=None, help="GPU architectures, e.g. sm_80,sm_90 (cuda).")
@click.option("--host", default=None, help="Host for metal/webgpu/opencl, e.g. macos or ios (metal).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Default: float32 on cpu, float16 on GPUs.")
@click.option("--select-layer", type=int, default=None, help="Python-style index into the hidden states.")
@click.option("--feature", type=FEATURE_CHOICE, default=None, help="patch (drop class token), cls_patch or pooled.")
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the model's).")
@click.option("--projector", type=PROJECTOR_CHOICE, default=None, help="Compile a projector in (default: the checkpoint's).")
@click.option("--projector-hidden-size", type=int, default=None, help="Projector output width (LLM width).")
@click.option(
    "--attention",
    type=click.Choice(ATTENTION),
    default=None,
    help="Attention lowering. cpu: 'fused' (default in float32; our kernel, scores stay in cache) or 'split'. "
    "cuda: 'split' (default), 'fused' (our flash-style kernel on CUDA cores; slower than 'split' on an H100) "
    "or 'tensorcore' (attention matmuls on tensor cores, our softmax kernel; not yet timed on a GPU). "
    "Other targets: 'split'.",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Library path (.so / .tar).")
def compile_cmd(
    model, target, arch, host, dtype, select_layer, feature, image_size, projector, projector_hidden_size, attention, output
):
    """Build a library from a preset or a checkpoint's config (no weights needed)."""
    from .compiler.export import build_library
    from .compiler.module import build_module
    from .compiler.targets import check_buildable, output_suffixes
    from .checkpoint.resolve import resolve_config

    check_buildable(target)
    config = resolve_config(
        model,
        select_layer=select_layer,
        feature=feature,
        image_size=image_size,
        projector=projector,
        projector_hidden_size=projector_hidden_size,
    )
    dtype = dtype or default_dtype(target)
    if output is None:
        output = default_output(model, target, output_suffixes(target)[0])
        output.parent.mkdir(parents=True, exist_ok=True)
    built = build_module(config, dtype, target, attention=attention)
    path = build_library(built.mod, target, output, arch=arch, host=host, metadata=built.metadata)
    meta = built.metadata
    click.echo(
        f"wrote {path} ({meta['family']}, {meta['image_size']}px, select_layer {meta['select_layer']}, "
        f"{meta['feature']} -> [batch, {meta['num_tokens']}, {meta['output_width']}] {dtype}) and {path}.json"
    )


# ---- convert -----------------------------------------------------------------------


@cli.command("convert")
@click.option("--model", "-m", required=True, help="Checkpoint directory or hub id.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Params directory to create.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Cast to this dtype (default: keep the checkpoint's).")
@click.option("--image-size", type=int, default=None, help="Interpolate position embeddings to this resolution.")
def convert_cmd(model, output, dtype, image_size):
    """Map a checkpoint's weights to the params a library takes."""
    from .weights.convert import convert

    path = convert(model, output, dtype=dtype, image_size=image_size)
    click.echo(f"wrote {path}")


# ---- run ---------------------------------------------------------------------------


def load_pixel_values(path: Path):
    import numpy as np

    try:
        array = np.load(path)
    except (OSError, ValueError) as err:
        raise MlcVisionError(f"cannot read pixel values {path}: {err}") from None
    if array.ndim != 4 or array.dtype.kind != "f":
        raise MlcVisionError(f"pixel values {path} must be a float [batch, 3, H, W] array, got {array.dtype} {list(array.shape)}")
    return array


def save_atomically(path: Path, array) -> None:
    import os
    import tempfile

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cli.command("run")
@click.option("--lib", required=True, type=click.Path(path_type=Path), help="Compiled library (.so).")
@click.option("--params", required=True, type=click.Path(path_type=Path), help="Params directory from convert.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable).")
@click.option("--pixel-values", type=click.Path(path_type=Path), default=None, help=".npy [batch,3,H,W] float32, preprocessed.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, metal, vulkan, ...")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Features .npy to write.")
def run_cmd(lib, params, images, pixel_values, device, output):
    """Turn images (or preprocessed pixels) into features."""
    from .runtime.encoder import VisionEncoder

    if bool(images) == bool(pixel_values):
        raise MlcVisionError("give either --image (one or more) or --pixel-values, not both or neither")
    inputs = load_pixel_values(pixel_values) if pixel_values else [str(p) for p in images]
    encoder = VisionEncoder(lib, params, device=device)
    features = encoder(inputs)
    save_atomically(output, features)
    click.echo(f"wrote {output}: {features.dtype} {list(features.shape)}")


# ---- inspect / targets --------------------------------------------------------------


@cli.command("inspect")
@click.argument("lib", type=click.Path(path_type=Path))
def inspect_cmd(lib):
    """Print a library's metadata: from the library itself, else from the JSON beside it."""
    if not lib.exists():
        raise MlcVisionError(f"library {lib} does not exist")
    try:
        metadata = _metadata_from_library(lib)
    except MlcVisionError as err:
        sidecar = Path(f"{lib}.json")
        if not sidecar.is_file():
            raise
        click.echo(f"note: {err}; showing {sidecar}", err=True)
        metadata = json.loads(sidecar.read_text())
    click.echo(json.dumps(metadata, indent=2, sort_keys=True))


def _metadata_from_library(lib: Path) -> dict:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from .runtime.encoder import load_library, read_metadata

    module = load_library(lib)
    try:
        vm = VirtualMachine(module, tvm.cpu())
    except Exception as err:  # e.g. a CUDA library on a machine without the CUDA driver
        raise MlcVisionError(f"cannot start {lib} here: {str(err).splitlines()[0]}") from None
    return read_metadata(vm, lib)


@cli.command("targets")
def targets_cmd():
    """List the targets and whether this installation can build them."""
    from .compiler.targets import availability

    for row in availability():
        mark = "yes" if row.buildable else "no "
        click.echo(f"{row.name:<8} {mark}  {row.output_suffix:<6} {row.reason}")


@cli.command("bench")
@click.option("--model", "-m", "models", multiple=True, default=None, help="Preset (repeatable).")
@click.option("--target", default="cpu", show_default=True)
@click.option("--batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--runs", default=10, show_default=True, help="Timed runs per row (median reported).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--no-torch-compile", is_flag=True, help="Skip torch.compile.")
def bench_cmd(models, target, batch, runs, output, no_torch_compile):
    """Time our library against the torch reference in the same process (random weights)."""
    from .bench import run_benchmark

    batches = [int(b) for b in batch.split(",") if b]
    run_benchmark(list(models) or None, target, batches, runs, output, torch_compile=not no_torch_compile)


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="mlc-vision", standalone_mode=False)
    except MlcVisionError as err:
        click.echo(f"error: {err}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as err:
        err.show()
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
