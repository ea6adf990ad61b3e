"""Which ops ONNX Runtime can run where: a kernel table per execution provider.

An op with no kernel on the target either fails to load (CPU) or silently falls back to the
CPU (CUDA), so every pipeline ends by checking the graph against this table. The CPU table is
read from the installed onnxruntime's kernel registry; the CUDA table is checked into the
project (``data/cuda_kernels_ort_1.2x.json``), written by :func:`compact_table` from ORT's
``docs/OperatorKernels.md``, because a CPU-only onnxruntime cannot list CUDA kernels.

Types are ONNX type names without ``tensor(...)``: ``float``, ``float16``, ``bfloat16``, ...
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx

from txcompile.graph.errors import TxError

CUDA_TABLE = Path(__file__).parent.parent / "data" / "cuda_kernels_ort_1.2x.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPEN = 2**31 - 1  # ORT's "and every later opset"
DEFAULT_DOMAIN = "ai.onnx"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One registered kernel: an op over an opset range, with allowed types per constraint."""

    domain: str
    op: str
    since: int
    until: int
    types: Mapping[str, frozenset[str]]

    def accepts(self, binding: Mapping[str, str]) -> bool:
        return all(t in self.types[name] for name, t in binding.items() if name in self.types)


class KernelTable:
    """Kernels of one execution provider, looked up by (domain, op) and opset version."""

    def __init__(self, provider: str, kernels: Iterable[Kernel], source: str) -> None:
        self.provider = provider
        self.source = source
        self._by_op: dict[tuple[str, str], list[Kernel]] = collections.defaultdict(list)
        for kernel in kernels:
            self._by_op[(kernel.domain, kernel.op)].append(kernel)

    def __len__(self) -> int:
        return sum(len(k) for k in self._by_op.values())

    def ops(self) -> set[tuple[str, str]]:
        return set(self._by_op)

    def kernels(self, domain: str, op: str, version: int | None = None) -> list[Kernel]:
        found = self._by_op.get((_domain(domain), op), [])
        return [k for k in found if version is None or k.since <= version <= k.until]

    def has(self, domain: str, op: str, version: int, binding: Mapping[str, str]) -> bool:
        return any(k.accepts(binding) for k in self.kernels(domain, op, version))

    def why_not(self, domain: str, op: str, version: int, binding: Mapping[str, str]) -> str | None:
        """None when a kernel fits; otherwise one line saying what is missing."""
        short = PROVIDERS_SHORT.get(self.provider, self.provider)
        if not self._by_op.get((_domain(domain), op)):
            return f"{short} has no {op} kernel"
        candidates = self.kernels(domain, op, version)
        if not candidates:
            spans = sorted({(k.since, k.until) for k in self.kernels(domain, op)})
            return f"{short} has no {op} kernel for opset {version} (has {_spans(spans)})"
        if any(k.accepts(binding) for k in candidates):
            return None
        wanted = ", ".join(f"{name}={t}" for name, t in sorted(binding.items()))
        offered = collections.defaultdict(set)
        for kernel in candidates:
            for name, allowed in kernel.types.items():
                if name in binding:
                    offered[name] |= allowed
        has = "; ".join(f"{name}: {' '.join(sorted(v))}" for name, v in sorted(offered.items()))
        return f"{short} has no {op} kernel for {wanted} (has {has or 'other types'})"

    def low_precision_ops(self, dtype: str) -> set[tuple[str, str]]:
        """(domain, op) pairs with at least one kernel taking ``dtype`` for some constraint."""
        return {
            key for key, ks in self._by_op.items() if any(dtype in a for k in ks for a in k.types.values())
        }


PROVIDERS_SHORT = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "CUDA"}


def _domain(domain: str) -> str:
    return DEFAULT_DOMAIN if domain in ("", DEFAULT_DOMAIN) else domain


def _spans(spans: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}+" if b >= OPEN else f"{a}-{b}" for a, b in spans)


def type_name(onnx_type: str) -> str | None:
    """``tensor(float16)`` → ``float16``; sequences and other non-tensors → None."""
    match = re.fullmatch(r"tensor\((\w+)\)", onnx_type.strip())
    return match.group(1) if match else None


def dtype_name(elem_type: int) -> str:
    """ONNX TensorProto element type → the name kernel tables use (``FLOAT16`` → ``float16``)."""
    return onnx.TensorProto.DataType.Name(elem_type).lower()


# --- CPU: the installed runtime ------------------------------------------------------------


@functools.cache
def cpu_table() -> KernelTable:
    from onnxruntime.capi import _pybind_state as ort_c

    kernels = []
    for kdef in ort_c.get_all_opkernel_def():
        if kdef.provider != PROVIDERS["cpu"]:
            continue
        types = {
            name: frozenset(t for t in (type_name(s) for s in allowed) if t)
            for name, allowed in kdef.type_constraints.items()
        }
        since, until = kdef.version_range
        kernels.append(Kernel(_domain(kdef.domain), kdef.op_name, since, until, types))
    import onnxruntime

    return KernelTable(PROVIDERS["cpu"], kernels, f"onnxruntime {onnxruntime.__version__} kernel registry")


# --- CUDA: the checked-in table --------------------------------------------------------------


@functools.cache
def cuda_table() -> KernelTable:
    return load_table(CUDA_TABLE)


def load_table(path: str | Path) -> KernelTable:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    aliases = {name: text.split() for name, text in data["aliases"].items()}
    kernels = []
    for domain, ops in data["kernels"].items():
        for op, entry in ops.items():
            since, constraints, until = entry[0], entry[1], entry[2] if len(entry) > 2 else OPEN
            types = {name: frozenset(_expand(text, aliases)) for name, text in constraints.items()}
            kernels.append(Kernel(domain, op, since, until, types))
    return KernelTable(data["provider"], kernels, data["source"])


def _expand(text: str, aliases: Mapping[str, list[str]]) -> list[str]:
    out = []
    for token in text.split():
        out.extend(aliases[token] if token.startswith("@") else [token])
    return out


def table_for(device: str) -> KernelTable:
    if device == "cpu":
        return cpu_table()
    if device == "cuda":
        return cuda_table()
    raise TxError(f"no kernel table for device {device!r}: choose cpu or cuda")


# --- generating the CUDA table from OperatorKernels.md ---------------------------------------

_ROW = re.compile(r"^\|(?P<op>[^|]*)\|(?P<params>[^|]*)\|(?P<versions>[^|]*)\|(?P<types>[^|]*)\|\s*$")
_DOMAIN = re.compile(r"\*\*Operator Domain:\*\* \*(?P<domain>[\w.]+)\*")


def parse_operator_kernels_md(text: str, provider: str) -> dict[str, dict[str, list[tuple]]]:
    """The rows of one provider's section: domain → op → [(since, until, {constraint: types})]."""
    anchor = f"## Operators implemented by {provider}"
    if anchor not in text:
        raise TxError(f"OperatorKernels.md has no section for {provider}")
    section = text.split(anchor, 1)[1].split("\n## ", 1)[0]
    table: dict[str, dict[str, list[tuple]]] = collections.defaultdict(dict)
    domain, op = DEFAULT_DOMAIN, None
    for line in section.splitlines():
        heading = _DOMAIN.search(line)
        if heading:
            domain = heading.group("domain")
            continue
        row = _ROW.match(line.strip())
        if not row or not row.group("versions").strip() or row.group("versions").strip().startswith("-"):
            continue
        if row.group("op").strip():
            op = row.group("op").strip()
        if op is None or op == "Op Name":
            continue
        since, until = _versions(row.group("versions"))
        table[domain].setdefault(op, []).append((since, until, _constraints(row.group("types"))))
    return {d: dict(ops) for d, ops in table.items()}


def _versions(text: str) -> tuple[int, int]:
    text = text.strip()
    if text.endswith("+"):
        return int(text[:-1]), OPEN
    if text.startswith("["):
        low, high = text.strip("[]").split(",")
        return int(low), int(high)
    return int(text), int(text)


def _constraints(text: str) -> dict[str, list[str]]:
    out = {}
    for part in text.split("<br/>"):
        name, _, allowed = part.partition("=")
        name = name.strip().strip("*").strip()
        types = sorted(set(re.findall(r"(?<!seq\()tensor\((\w+)\)", allowed)))
        if name and types:  # a seq(...)-only constraint has no tensor types and is left out
            out[name] = types
    return out


def compact_table(parsed: Mapping[str, Mapping[str, list[tuple]]], aliases: Mapping[str, str]) -> dict:
    """The checked-in form: per op its first opset and the newest range's types, aliases folded."""
    alias_sets = [(name, set(text.split())) for name, text in aliases.items()]
    kernels: dict[str, dict[str, list]] = {}
    for domain, ops in parsed.items():
        if domain not in (DEFAULT_DOMAIN, "com.microsoft"):
            continue
        for op, ranges in sorted(ops.items()):
            newest = max(ranges, key=lambda r: r[0])
            since = min(r[0] for r in ranges)
            until = max(r[1] for r in ranges)
            types = {name: _fold(set(ts), alias_sets) for name, ts in sorted(newest[2].items())}
            kernels.setdefault(domain, {})[op] = [since, types] + ([until] if until < OPEN else [])
    return kernels


def _fold(types: set[str], alias_sets: list[tuple[str, set[str]]]) -> str:
    tokens = []
    for name, members in alias_sets:
        if members <= types:
            tokens.append(name)
            types = types - members
    return " ".join(tokens + sorted(types))


# --- which types a node binds to its op's type constraints -----------------------------------


@functools.cache
def _schemas() -> dict[tuple[str, str], list]:
    from onnxruntime.capi import _pybind_state as ort_c

    found = collections.defaultdict(list)
    for schema in ort_c.get_all_operator_schema():
        found[(_domain(schema.domain), schema.name)].append(schema)
    for schemas in found.values():
        schemas.sort(key=lambda s: s.since_version)
    return dict(found)


def schema_for(domain: str, op: str, version: int):
    """The op's schema in force at ``version`` (ORT's registry: ONNX and contrib ops), or None."""
    fitting = [s for s in _schemas().get((_domain(domain), op), []) if s.since_version <= version]
    return fitting[-1] if fitting else None


def formal_types(schema, count: int, outputs: bool = False) -> list[str]:
    """The type string (constraint name or concrete type) of each of ``count`` actual values."""
    params = schema.outputs if outputs else schema.inputs
    types = []
    for index in range(count):
        if index < len(params):
            types.append(params[index].typeStr)
        elif params and params[-1].option == params[-1].option.Variadic:
            types.append(params[-1].typeStr)
        else:
            types.append("")
    return types


def bind(schema, inputs: list[str | None], outputs: list[str | None]) -> dict[str, str]:
    """Constraint name → the type the node uses for it, from the dtypes we know."""
    constraints = {c.type_param_str for c in schema.type_constraints}
    binding: dict[str, str] = {}
    for formal, dtype in [
        *zip(formal_types(schema, len(inputs)), inputs, strict=True),
        *zip(formal_types(schema, len(outputs), outputs=True), outputs, strict=True),
    ]:
        if dtype and formal in constraints:
            binding.setdefault(formal, dtype)
    return binding


def output_types(schema, node_attrs: Mapping, inputs: list[str | None], count: int) -> list[str | None]:
    """Output dtypes the schema implies: a bound constraint, a fixed type, or Cast's ``to``."""
    binding = bind(schema, inputs, [None] * count)
    result = []
    for formal in formal_types(schema, count, outputs=True):
        fixed = type_name(formal) if formal.startswith("tensor(") else None
        result.append(binding.get(formal) or fixed)
    if schema.name in ("Cast", "CastLike") and "to" in node_attrs:
        result = [dtype_name(node_attrs["to"])] * count
    return result
