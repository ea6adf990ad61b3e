"""One function per CLI command; each returns the exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from txcompile import api, compiler, pipelines, render, report
from txcompile.graph import inputs as model_inputs
from txcompile.graph import modelio, progress, writes
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError, VerificationError, one_line
from txcompile.passes.targets import int8_matmul
from txcompile.runtime import bench as benchmark
from txcompile.runtime import generate as rgenerate
from txcompile.runtime import text as rtext

# Pipes and CI logs get a wide console so report tables are never cut to 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def showing_progress():
    """Progress bars on stderr for the long steps, when it is a terminal (graph/progress.py)."""
    shown = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    return progress.showing(render.ProgressDisplay(Console(stderr=True)) if shown else None)


def _exporters():
    return api._exporters()


def _settings(args, dims: dict[str, int]) -> compiler.Settings:
    return compiler.Settings(
        target=args.target,
        passes=args.passes,
        disable=args.disable_pass,
        atol=args.atol,
        verify=args.verify,
        dims=dims,
        inputs_npz=args.inputs,
        debug=args.debug,
        flags=dict(vars(args)),  # every flag: each pass fills its Options from the ones it declares
    )


def _base_dims(args) -> dict[str, int]:
    return {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v}


def _export(args):
    torch_model, result, dims = api.export(
        args.model,
        task=getattr(args, "task", None),
        attn_implementation=args.attn_implementation,
        opset=args.opset,
        exporter=args.exporter,
        dims=_base_dims(args),
        input_shapes=args.input_shape,
        dynamic=args.dynamic,
    )
    for warning in [*torch_model.warnings, *result.warnings]:
        console.print(f"warning: {warning}")
    fallback = f" (fell back: {result.fallback_reason})" if result.fallback_reason else ""
    console.print(
        f"exported {args.model} with the {result.exporter} exporter{fallback} in {result.seconds:.1f} s, "
        f"opset {result.opset}; max diff vs PyTorch {result.max_diff:.3g}"
    )
    return torch_model, result, dims


def _model_outputs(output: str | Path, with_report: bool = True) -> list[Path]:
    """A model output with the files written beside it: external data and the report."""
    output = Path(output)
    files = [output, output.with_name(output.name + ".data")]
    return [*files, report.report_path(output)] if with_report else files


def export(args) -> int:
    output = Path(args.output)
    writes.check_outputs(_model_outputs(output, with_report=False), _exporters().spec_files(args.model))
    _, result, _ = _export(args)
    modelio.save_model(result.ir_model, output)
    console.print(f"wrote {output}")
    return 0


def _finish(outcome: api.Compiled, output: Path, strict: bool = False) -> int:
    report_file = compiler.write(outcome.outcome, output)
    render.print_report(outcome.report, console)
    console.print(f"wrote {output} and {report_file}")
    unfused = [s for s in render.attention_coverage(outcome.report) if s["status"] != "fused"]
    if strict and unfused:
        first = unfused[0]
        raise VerificationError(
            f"--strict: {len(unfused)} attention site(s) unfused; {first['site']}: {first['reason']}"
        )
    if outcome.passed is False:
        check = outcome.report["verification"]
        raise VerificationError(
            f"max diff {check['max_diff']:.3g} vs {check['reference']} exceeds atol {check['atol']:g}"
        )
    return 0


def optimize(args) -> int:
    output, given = Path(args.output), [args.model, args.inputs, args.calib]
    writes.check_outputs(_model_outputs(output), given)
    pipelines.pass_names(args.target, args.passes, args.disable_pass)
    # the weights stay in their files until the run's workspace copies them; checked there
    model, model_files = modelio.load_model_and_files(args.model, weights=False, check=False)
    writes.check_outputs(_model_outputs(output), [*model_files, *given[1:]])
    dims = model_inputs.dims_from_shapes(model_inputs.read_specs(model), args.input_shape, _base_dims(args))
    source = modelio.to_ir(model, args.model, base_dir=Path(args.model).parent)
    del model
    outcome = api.optimize_model(source, _settings(args, dims), source=args.model, output=str(output))
    return _finish(outcome, output, strict=getattr(args, "strict", False))


def compile(args) -> int:
    output = Path(args.output)
    outputs = _model_outputs(output) + (
        _model_outputs(args.save_export, with_report=False) if args.save_export else []
    )
    writes.check_outputs(outputs, [*_exporters().spec_files(args.model), args.inputs, args.calib])
    pipelines.pass_names(args.target, args.passes, args.disable_pass)
    torch_model, result, dims = _export(args)
    if args.save_export:
        modelio.save_model(result.ir_model, args.save_export)
    outcome = api.compile_exported(torch_model, result, _settings(args, dims), output=str(output))
    return _finish(outcome, output, strict=getattr(args, "strict", False))


def inspect(args) -> int:
    path = Path(args.path)
    if path.suffix == ".onnx":
        path = report.report_path(path)
        if not path.exists():
            raise TxError(f"{args.path}: no report next to it ({path.name}); `txcompile optimize` writes one")
    writes.check_outputs([args.html], [args.path, path], models=False)
    loaded = report.load(path)
    for name in report.mismatched_files(loaded, path.parent):
        console.print(f"warning: {name} is missing or not the file this report describes (rewritten since?)")
    with _damaged_report(path):
        if args.html:
            writes.write_text(args.html, render.to_html(loaded))
            console.print(f"wrote {args.html}")
        if args.json:
            print(report.dumps(loaded), end="")
        elif not args.html:
            render.print_report(loaded, console)
    return 0


@contextlib.contextmanager
def _damaged_report(path: Path):
    """A report with the right schema tag whose fields are not what txcompile wrote (edited,
    damaged, or made up) cannot be rendered: bad input, one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as err:
        raise TxError(
            f"{path}: damaged report ({type(err).__name__}: {one_line(err)}); "
            "`txcompile optimize` writes a fresh one"
        ) from None


def _feeds(args, model) -> dict[str, np.ndarray]:
    specs = model_inputs.read_specs(model)
    if args.inputs:
        return model_inputs.load_npz(args.inputs, specs)
    dims = model_inputs.dims_from_shapes(specs, args.input_shape, _base_dims(args))
    return model_inputs.make_feeds(specs, dims)


def _warn_int8_weights(model) -> None:
    """8-bit int8 weights on a CPU whose int8 kernel saturates them (x86 without VNNI)."""
    bits = {p.key: p.value for p in model.metadata_props}.get(int8_matmul.WEIGHT_BITS_KEY)
    line = int8_matmul.saturation_warning(int(bits) if bits and bits.isdigit() else None)
    if line:
        console.print(f"warning: {line}")


def run(args) -> int:
    if args.text:
        return _run_text(args)
    encrypted = getattr(args, "encrypted", False)  # the only run that reads the weights itself
    model, reads = modelio.load_model_and_files(args.model, weights=encrypted)
    other_model, compared_files = (
        modelio.load_model_and_files(args.compare, weights=False) if args.compare else (None, [])
    )
    reads += [args.inputs, *compared_files]
    reads += _exporters().spec_files(args.reference) if args.reference else []
    writes.check_outputs([writes.npz_path(args.save_outputs) if args.save_outputs else None], reads)
    _warn_int8_weights(model)
    feeds = _feeds(args, model)
    if encrypted:
        return _run_encrypted(args, model, feeds)
    with rt.refusal(args.model), progress.step(f"running {args.model}"):
        outputs = rt.run(rt.create_session(args.model, args.device), feeds)
    table = Table(show_edge=False)
    for column in ("output", "shape", "dtype", "mean", "std", "min", "max"):
        table.add_column(column)
    for name, value in outputs.items():
        numeric = value.astype(np.float64) if value.size else np.zeros(1)
        table.add_row(
            name,
            "x".join(map(str, value.shape)),
            str(value.dtype),
            f"{numeric.mean():.4g}",
            f"{numeric.std():.4g}",
            f"{numeric.min():.4g}",
            f"{numeric.max():.4g}",
        )
    console.print(f"inputs: {', '.join(f'{k} {tuple(v.shape)}' for k, v in feeds.items())}")
    console.print(table)
    if args.save_outputs:
        console.print(f"wrote {writes.write_npz(args.save_outputs, outputs)}")
    other, real_rows = None, rt.padded_rows(model, feeds)
    if args.compare:
        with rt.refusal(f"--compare {args.compare}"):
            other, label = rt.run(rt.create_session(args.compare, args.device), feeds), args.compare
        real_rows = real_rows or rt.padded_rows(other_model, feeds)  # either side may skip padding
    elif args.reference is not None:
        source = args.reference or _recorded_builtin(model, args.model)
        other, label = api.torch_runner(_exporters().load_model_spec(source))(feeds), f"PyTorch ({source})"
    if other is not None:
        diff = rt.max_abs_diff(outputs, other, real_rows)
        console.print(f"max diff vs {label}: {diff:.3g} (atol {args.atol:g})")
        if not diff <= args.atol:
            raise VerificationError(f"max diff {diff:.3g} vs {label} exceeds atol {args.atol:g}")
    return 0


def _run_text(args) -> int:
    """Tokenize with the model's own tokenizer, run, and print the task's answer."""
    alone = [
        f
        for f, on in (
            ("--inputs", args.inputs),
            ("--compare", args.compare),
            ("--reference", args.reference is not None),
            ("--encrypted", args.encrypted),
        )
        if on
    ]
    if alone:
        raise TxError(f"--text runs the model on text alone; drop {', '.join(alone)}")
    model = api.load(args.model, device=args.device)
    writes.check_outputs([writes.npz_path(args.save_outputs) if args.save_outputs else None], model.files)
    if not model.has_tokenizer:
        raise TxError(f"{args.model}: saved without a tokenizer (compile it from a folder that has one)")
    texts = list(args.text)
    if model.task == "question-answering":
        if len(texts) != 2:
            raise TxError("question-answering takes two --text: the question, then the context")
        texts = [(texts[0], texts[1])]
    outputs = model(texts)
    _print_answers(model, texts, outputs)
    if args.save_outputs:
        console.print(f"wrote {writes.write_npz(args.save_outputs, outputs)}")
    return 0


def _print_answers(model, texts: list, outputs: dict[str, np.ndarray]) -> None:
    first = outputs[model.output_names[0]]
    table = Table(show_edge=False)
    if model.task == "sentence-embedding":
        table.add_column("text")
        table.add_column("norm")
        for i in range(len(texts)):
            table.add_column(f"cos {i}")
        matrix = rtext.cosines(first)
        for i, text in enumerate(texts):
            table.add_row(_short(text), f"{np.linalg.norm(first[i]):.4f}", *[f"{c:.4f}" for c in matrix[i]])
        console.print(f"sentence_embedding: {first.shape[-1]} dimensions")
    elif model.task in ("text-classification", "image-classification"):
        table.add_column("text")
        table.add_column("top labels")
        for text, row in zip(texts, first, strict=True):
            table.add_row(
                _short(text), ", ".join(f"{label} {p:.3f}" for label, p in rtext.top_labels(model, row))
            )
    elif model.task == "token-classification":
        for column in ("text", "token", "label", "score"):
            table.add_column(column)
        for text, rows in zip(texts, first, strict=True):
            for token, label, p in rtext.token_labels(model, text, rows):
                table.add_row(_short(text), token, label, f"{p:.3f}")
    elif model.task == "question-answering":
        ((question, context),) = texts
        span, p = rtext.best_span(
            model, question, context, outputs["start_logits"][0], outputs["end_logits"][0]
        )
        console.print(f"answer: {span!r} (score {p:.3f})")
        return
    else:  # feature-extraction, text-generation, or no task recorded: the outputs per text
        table.add_column("text")
        for name in model.output_names:
            table.add_column(f"{name} shape")
            table.add_column("norm")
        for i, text in enumerate(texts):
            cells = []
            for name in model.output_names:
                row = outputs[name][i]
                cells += ["x".join(map(str, row.shape)), f"{np.linalg.norm(row.astype(np.float64)):.4g}"]
            table.add_row(_short(text), *cells)
    console.print(table)


def _short(text, width: int = 48) -> str:
    text = " / ".join(text) if isinstance(text, tuple) else text
    return text if len(text) <= width else text[: width - 1] + "…"


def _recorded_builtin(model, path: str) -> str:
    """The built-in model ``model`` was exported from. A recorded folder or factory file is refused:
    the file came with the model, so importing what it names would run code the user never named."""
    source = {p.key: p.value for p in model.metadata_props}.get(_exporters().SOURCE_KEY)
    if not source:
        raise TxError(f"{path} records no PyTorch source; name one: --reference MODEL, or use --compare")
    if source not in _exporters().BUILTINS:
        raise TxError(
            f"{path} was exported from {source!r}, which is not built in; "
            f"name it yourself to run its code: --reference {source}"
        )
    return source


def _run_encrypted(args, model, feeds) -> int:
    """CKKS (TenSEAL) evaluation of a polynomial graph, compared with its plaintext ORT run."""
    from txcompile.runtime import he

    result = he.run_encrypted(model, feeds, args.level_budget)
    params = result.parameters
    console.print(
        f"encrypted run: {result.seconds:.1f} s, depth {result.depth} levels, "
        f"{result.ciphertexts} input ciphertexts; CKKS N={params['poly_modulus_degree']}, "
        f"moduli {params['coeff_mod_bit_sizes']}, scale {params['global_scale']}; "
        f"mults {params['multiplications']}"
    )
    console.print(f"max diff decrypted vs plaintext ORT: {result.max_diff:.3g} (atol {args.atol:g})")
    if args.save_outputs:
        console.print(f"wrote {writes.write_npz(args.save_outputs, result.outputs)}")
    if not result.max_diff <= args.atol:
        raise VerificationError(f"decrypted outputs differ by {result.max_diff:.3g} > atol {args.atol:g}")
    return 0


def bench(args) -> int:
    loaded = [(name, *modelio.load_model_and_files(name, weights=False)) for name in args.models]
    writes.check_outputs([args.json], [path for _, _, files in loaded for path in files], models=False)
    for _, model, _ in loaded:
        _warn_int8_weights(model)
    specs = model_inputs.read_specs(loaded[0][1])
    del loaded  # sessions read each model from its file; no second copy of the weights is kept
    threads = args.threads or benchmark.default_threads()
    sessions = []
    for name in args.models:  # no display while timing: it would take CPU from the runs
        with rt.refusal(name), progress.step(f"loading {name}"):
            sessions.append((name, rt.create_session(name, args.device, threads=threads)))
    table = Table(title=f"latency, {threads} threads, {args.device}", show_edge=False)
    for column in ("batch", "seq", "model", "median ms", "p90 ms", "speedup", "per-round range"):
        table.add_column(column, justify="left" if column == "model" else "right")
    timings = []
    for batch in args.batch:
        for seq in args.seq:
            dims = {"batch": batch, "seq": seq}
            feeds = model_inputs.make_feeds(specs, dims)
            for name, session in sessions:  # one untimed run each: a model that refuses these inputs
                with rt.refusal(f"{name} at batch {batch}, seq {seq}"):
                    rt.run(session, feeds)
            for timing in benchmark.bench(sessions, feeds, dims, warmup=args.warmup, iters=args.iters):
                timings.append(timing)
                table.add_row(
                    str(batch),
                    str(seq),
                    timing.model,
                    f"{timing.median_ms:.2f}",
                    f"{timing.p90_ms:.2f}",
                    f"{timing.paired_speedup:.2f}×",
                    "{:.2f}–{:.2f}×".format(*timing.paired_range),
                )
    console.print(table)
    if args.json:
        rows = [dataclasses.asdict(t) for t in timings]
        writes.write_text(
            args.json, json.dumps({"threads": threads, "device": args.device, "timings": rows}, indent=2)
        )
    return 0


def passes(args) -> int:
    table = Table(title="passes", show_edge=False)
    for column in ("pass", "kind", "what it does"):
        table.add_column(column)
    for name, cls in pipelines.PASSES.items():
        table.add_row(name, "exact" if cls.exact else "approximate", cls.summary)
    console.print(table)
    lines = Table(title="pipelines", show_edge=False)
    for column in ("pipeline", "for", "passes"):
        lines.add_column(column)
    for name, (summary, names) in pipelines.PIPELINES.items():
        lines.add_row(name, summary, ", ".join(names))
    console.print(lines)
    return 0


def generate(args) -> int:
    """Greedy or sampled generation; the text (or ids), prefill ms and decode tokens/s."""
    sampled = [
        f
        for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p))
        if v is not None
    ]
    if args.greedy and sampled:
        raise TxError(f"--greedy chooses the most likely token; drop {', '.join(sampled)} or --greedy")
    sampling = None
    if sampled:
        sampling = rgenerate.Sampling(
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k or 0,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=args.seed,
        )
    with progress.step(f"loading {args.model}"):
        generator = rgenerate.Generator(
            args.model, device=args.device, threads=args.threads, tokenizer=args.tokenizer
        )
    prompts = args.prompt_ids or [generator.encode(text) for text in args.prompt]
    result = generator.generate(prompts, args.max_new_tokens, sampling=sampling, eos_ids=args.eos_id)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for index, ids in enumerate(result.ids):
        shown = generator.decode(ids) if args.prompt else ",".join(map(str, ids))
        if args.prompt:
            console.print(f"[bold]{_short(args.prompt[index])}[/bold]{shown}", highlight=False, markup=True)
        else:
            console.print(shown, highlight=False)
    console.print(
        f"prefill {result.prefill_ms:.1f} ms; decode {result.decode_tokens_per_s:.1f} tokens/s "
        f"({result.decode_tokens} tokens; stopped at {result.stopped})"
    )
    return 0
