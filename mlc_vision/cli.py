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

from .compiler.targets import ATTENTION, GEMM
from .config import DTYPES, FEATURES, PROJECTORS
from .errors import MlcVisionError

DTYPE_CHOICE = click.Choice(DTYPES)
FEATURE_CHOICE = click.Choice(FEATURES)
PROJECTOR_CHOICE = click.Choice(("none", *PROJECTORS))
PART_CHOICE = click.Choice(("vision", "text", "both"))


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
    "'tensorcore' (attention matmuls on tensor cores, our softmax kernel) or 'flash' (our flash-attention "
    "kernel on tensor cores, fp16/bf16); 'tensorcore' and 'flash' are not yet timed on a GPU. "
    "Other targets: 'split'.",
)
@click.option(
    "--gemm",
    type=click.Choice(GEMM),
    default=None,
    help="Matmul schedule (cuda, float16): 'dlight' (default; WMMA) or 'mma' (mma.sync with ldmatrix, a cp.async "
    "pipeline and swizzled shared memory; not yet timed on a GPU). Other targets: 'dlight'.",
)
@click.option(
    "--cpu", default=None,
    help="cpu target: the CPU to compile for, an LLVM name (x86-64-v3, x86-64-v4, sapphirerapids, znver4, ...). "
    "Default: this machine's CPU. The library refuses to run on a CPU without its instruction sets.",
)  # fmt: skip
@click.option(
    "--part", type=PART_CHOICE, default="vision", show_default=True,
    help="vision: the tower's features; text: a contrastive model's encode_text; both: encode_text and the "
    "pooled image embedding (what `similarity` runs). text/both need a whole CLIP/SigLIP/EVA-CLIP checkpoint.",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Library path (.so / .tar).")
def compile_cmd(
    model, target, arch, host, dtype, select_layer, feature, image_size, projector, projector_hidden_size, attention, gemm,
    cpu, part, output,
):
    """Build a library from a preset or a checkpoint's config (no weights needed)."""
    from .compiler.export import build_library
    from .compiler.module import build_module
    from .compiler.targets import check_buildable, output_suffixes
    from .checkpoint.resolve import resolve_config
    from .compiler.export import check_output

    check_buildable(target)
    if output is None:  # dist/<model>-<target>.so: the default's folder is ours to create
        output = default_output(model, target, output_suffixes(target)[0])
        output.parent.mkdir(parents=True, exist_ok=True)
    check_output(target, output)  # before any work: suffix, writable, dead runs' leftovers
    if part != "vision":
        tower_options = {"--select-layer": select_layer, "--projector": projector,
                         "--projector-hidden-size": projector_hidden_size,
                         "--feature": feature if feature != "pooled" else None}
        given = [name for name, value in tower_options.items() if value is not None]
        if given:
            raise MlcVisionError(f"--part {part} compiles the pooled image embedding; {', '.join(given)} do not apply")
        _compile_contrastive(model, target, arch, host, dtype, image_size, attention, gemm, cpu, part, output)
        return
    config = resolve_config(
        model,
        select_layer=select_layer,
        feature=feature,
        image_size=image_size,
        projector=projector,
        projector_hidden_size=projector_hidden_size,
    )
    dtype = dtype or default_dtype(target)
    built = build_module(config, dtype, target, attention=attention, gemm=gemm, cpu=cpu)
    path = build_library(built.mod, target, output, arch=arch, host=host, metadata=built.metadata)
    meta = built.metadata
    if meta.get("native_resolution"):
        shape = f"native resolution -> [tokens, {meta['output_width']}] {dtype}"
    else:
        shape = (f"{meta['image_size']}px, select_layer {meta['select_layer']}, "
                 f"{meta['feature']} -> [batch, {meta['num_tokens']}, {meta['output_width']}] {dtype}")  # fmt: skip
    click.echo(f"wrote {path} ({meta['family']}, {shape}) and {path}.json")


def _compile_contrastive(model, target, arch, host, dtype, image_size, attention, gemm, cpu, part, output) -> None:
    from .checkpoint.resolve import resolve_config, resolve_text_config
    from .compiler.contrastive import build_contrastive_module
    from .compiler.export import build_library
    from .compiler.targets import output_suffixes

    config = resolve_config(model, image_size=image_size, feature="pooled", projector="none")
    dtype = dtype or default_dtype(target)
    built = build_contrastive_module(config, resolve_text_config(model), dtype, target, part, attention=attention,
                                     gemm=gemm, cpu=cpu)
    output = output or default_output(model, target, output_suffixes(target)[0])
    path = build_library(built.mod, target, output, arch=arch, host=host, metadata=built.metadata)
    text = built.metadata["text"]
    click.echo(
        f"wrote {path} ({built.metadata['family']} {part}: encode_text -> [batch, {text['projection_dim']}]"
        + (f", encode -> [batch, 1, {built.metadata['output_width']}]" if part == "both" else "")
        + f" {dtype}) and {path}.json"
    )


# ---- convert -----------------------------------------------------------------------


@cli.command("convert")
@click.option("--model", "-m", required=True, help="Checkpoint directory or hub id.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Params directory to create.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Cast to this dtype (default: keep the checkpoint's).")
@click.option("--image-size", type=int, default=None, help="Interpolate position embeddings to this resolution.")
@click.option("--part", type=PART_CHOICE, default="vision", show_default=True,
              help="vision tower, a contrastive model's text tower (+ tokenizer), or both.")
def convert_cmd(model, output, dtype, image_size, part):
    """Map a checkpoint's weights to the params a library takes."""
    from .atomic import check_writable
    from .weights.convert import convert

    check_writable(output, directory=True, what="params dir")
    path = convert(model, output, dtype=dtype, image_size=image_size, part=part)
    click.echo(f"wrote {path}")


# ---- run ---------------------------------------------------------------------------


def load_pixel_values(path: Path):
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise MlcVisionError(f"cannot read pixel values {path}: {err}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise MlcVisionError(f"pixel values {path} must be one .npy array, not an .npz archive")
    if array.ndim != 4 or array.dtype.kind != "f":
        raise MlcVisionError(f"pixel values {path} must be a float [batch, 3, H, W] array, got {array.dtype} {list(array.shape)}")
    return array


def save_atomically(path: Path, array) -> None:
    import io

    import numpy as np

    from .atomic import write_file

    buffer = io.BytesIO()
    np.save(buffer, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, buffer.getvalue())


@cli.command("run")
@click.option("--lib", required=True, type=click.Path(path_type=Path), help="Compiled library (.so).")
@click.option("--params", required=True, type=click.Path(path_type=Path), help="Params directory from convert.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable).")
@click.option("--pixel-values", type=click.Path(path_type=Path), default=None, help=".npy [batch,3,H,W] float32, preprocessed.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, metal, vulkan, ...")
@click.option("--max-tiles", type=int, default=None,
              help="InternVL tiles: most tiles per image (default: the checkpoint's max_dynamic_patch, else 12).")
@click.option("--min-tiles", type=int, default=None, help="InternVL tiles: fewest tiles per image (default: the library's).")
@click.option("--thumbnail/--no-thumbnail", default=None,
              help="InternVL tiles: add the whole image as one more tile when the grid has several (default: the library's).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Features .npy to write (a library with more outputs writes each beside it: OUT.query_outputs.npy).")
@click.option("--verify", is_flag=True, help="Check the params shards' checksums before running (sizes are always checked).")
def run_cmd(lib, params, images, pixel_values, device, max_tiles, min_tiles, thumbnail, output, verify):
    """Turn images (or preprocessed pixels) into features.

    A library with a tiling contract cuts each image into tiles and prints
    each image's grid. InternVL: the features of every image's tiles, one
    image after the other (``[total tiles, tokens, width]``). LLaVA-NeXT
    anyres: the packed sequences the language model reads, one after the
    other (``[total tokens, width]``).
    """
    import numpy as np

    from .atomic import check_writable
    from .runtime.encoder import VisionEncoder

    if bool(images) == bool(pixel_values):
        raise MlcVisionError("give either --image (one or more) or --pixel-values, not both or neither")
    check_writable(output)
    tile_options = {"max_tiles": max_tiles, "min_tiles": min_tiles, "thumbnail": thumbnail}
    encoder = VisionEncoder(lib, params, device=device, verify=verify)
    tiled = bool(images) and (encoder.tiling is not None or any(v is not None for v in tile_options.values()))
    if encoder.native_resolution is not None:
        features = _run_native(encoder, images, pixel_values)
    elif tiled:
        results = encoder.encode_tiles([str(p) for p in images], **tile_options)
        for path, result in zip(images, results):
            click.echo(f"{path}: {describe_tiles(result)}")
        features = np.concatenate([r.features if r.packed is None else r.packed for r in results], axis=0)
    else:
        features = encoder(load_pixel_values(pixel_values) if pixel_values else [str(p) for p in images])
    outputs = features if isinstance(features, tuple) else (features,)
    for name, array in zip(encoder.output_names, outputs):
        save_output(output_path(output, name, first=name == encoder.output_names[0]), array)


def output_path(output: Path, name: str, first: bool) -> Path:
    """Where ``run`` writes one output: ``--output`` for the features, ``<stem>.<name>.npy`` beside it for others."""
    if first:
        return output
    stem = output.name[: -len(".npy")] if output.name.endswith(".npy") else output.name
    return output.with_name(f"{stem}.{name}.npy")


def save_output(path: Path, array) -> None:
    note = ""
    if array.dtype.name == "bfloat16":  # .npy has no bf16: numpy would read the file back as raw bytes
        array, note = array.astype("float32"), " (bfloat16 library, widened exactly)"
    save_atomically(path, array)
    click.echo(f"wrote {path}: {array.dtype} {list(array.shape)}{note}")


def _run_native(encoder, images, pixel_values):
    """A native-resolution library: every image in one call, each image's patch grid and token count printed."""
    if pixel_values:
        raise MlcVisionError("a native-resolution library takes --image (it resizes each image itself), not --pixel-values")
    result = encoder.encode_native([str(p) for p in images])
    for path, (t, rows, cols), tokens in zip(images, result.grid_thw, result.tokens_per_image):
        click.echo(f"{path}: grid_thw ({t}, {rows}, {cols}) -> {tokens} tokens")
    return result.features


def describe_tiles(result) -> str:
    """One line: the grid, the extra tile, and what the tiles became."""
    extra = " + thumbnail" if result.thumbnail else " + base image" if result.base else ""
    line = f"grid {result.grid}{extra} -> {len(result.features)} tiles"
    return line if result.packed is None else f"{line} -> {len(result.packed)} packed tokens"


# ---- similarity ------------------------------------------------------------------


@cli.command("similarity")
@click.option("--image", "images", multiple=True, required=True, type=click.Path(path_type=Path), help="Image (repeatable).")
@click.option("--text", "texts", multiple=True, required=True, help="Text (repeatable).")
@click.option("--model", "-m", default=None, help="Whole CLIP/SigLIP/EVA-CLIP checkpoint: compiled and converted for the CPU here.")
@click.option("--lib", type=click.Path(path_type=Path), default=None, help="Library from compile --part both.")
@click.option("--params", type=click.Path(path_type=Path), default=None, help="Params dir from convert --part both.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="Dir with tokenizer.json (default: the params dir).")
@click.option("--device", default="cpu", show_default=True)
def similarity_cmd(images, texts, model, lib, params, tokenizer, device):
    """Print image-text probabilities: softmax(logit_scale x cos) over the texts (CLIP, EVA-CLIP), sigmoid (SigLIP)."""
    import tempfile

    from .runtime.contrastive import ContrastiveEncoder

    if bool(model) == bool(lib and params) or (lib is None) != (params is None):
        raise MlcVisionError("give either --model, or --lib and --params")
    with tempfile.TemporaryDirectory(prefix="mlc-vision-similarity-") as work:
        if model:
            lib, params = _build_for_similarity(model, Path(work))
        encoder = ContrastiveEncoder(lib, params, device=device, tokenizer=tokenizer)
        probs = encoder.probabilities([str(p) for p in images], list(texts))
    kind = "softmax over texts" if encoder.text["logits"] == "softmax" else "sigmoid per pair"
    click.echo(f"# {encoder.metadata['family']}: {kind}")
    click.echo("\t".join(["image"] + [json.dumps(t) for t in texts]))
    for path, row in zip(images, probs):
        click.echo("\t".join([str(path)] + [f"{p:.4f}" for p in row]))


def _build_for_similarity(model: str, work: Path) -> tuple[Path, Path]:
    from .checkpoint.resolve import resolve_config, resolve_text_config
    from .compiler.contrastive import build_contrastive_module
    from .compiler.export import build_library
    from .weights.convert import convert

    params = convert(model, work / "params", part="both")
    config = resolve_config(model, feature="pooled", projector="none")
    built = build_contrastive_module(config, resolve_text_config(model), "float32", "cpu", "both")
    return build_library(built.mod, "cpu", work / "model.so", metadata=built.metadata), params


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
@click.option("--no-peers", is_flag=True, help="Skip ONNX Runtime and OpenVINO (the bench extra).")
@click.option("--bf16/--no-bf16", default=None, help="Time our bf16 library too (default: when this CPU has AVX2 + FMA, AVX-512, AVX512-BF16 or AMX).")
@click.option("--native-size", "native_sizes", multiple=True,
              help="HEIGHTxWIDTH image for native-resolution presets (repeatable; default 448x448 and 1008x672).")
@click.option("--tiles", type=click.IntRange(min=1), default=None,
              help="Presets with InternVL tiles: time encode_tiles on one image cut into this many tiles "
                   "(plus the thumbnail) instead of batches.")  # fmt: skip
def bench_cmd(models, target, batch, runs, output, no_torch_compile, no_peers, bf16, native_sizes, tiles):
    """Time our library against the torch reference in the same process (random weights)."""
    from .bench import parse_image_size, run_benchmark

    batches = [int(b) for b in batch.split(",") if b]
    sizes = [parse_image_size(s) for s in native_sizes] or None
    run_benchmark(
        list(models) or None, target, batches, runs, output, torch_compile=not no_torch_compile, peers=not no_peers,
        bf16=bf16, native_sizes=sizes, tiles=tiles,
    )


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def _os_error_line(err: OSError) -> str:
    """``OSError`` (full disk, read-only filesystem, a directory where a file goes...) as one line."""
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


def main(argv=None) -> int:
    """Run the CLI; every user error (ours, the OS's, click's usage errors) is one ``error:`` line and exit 1.

    ``--help`` and ``--version`` exit 0; nothing exits 2.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            cli.main(args=argv, prog_name="mlc-vision", standalone_mode=False)
        except MlcVisionError as err:
            click.echo(f"error: {err}", err=True)
            return 1
        except OSError as err:
            click.echo(f"error: {_os_error_line(err)}", err=True)
            return 1
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            return 1
        except click.ClickException as err:
            click.echo(f"error: {' '.join(err.format_message().split())}", err=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
