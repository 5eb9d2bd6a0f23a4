"""Exported models in onnxruntime, behind the eager model's interface.

`OrtModel` is callable like the eager zoo model (torch tensors in, torch tensors out) and,
for an encoder + one-step decoder pair, the same `greedy_decode` (seqfuse.decoding's loop,
the eager zoo seq2seq's too, around the exported decoder graph). So the task code that evaluates eager models (accuracy,
PER, RMSE...) evaluates an artifact or any of its variants unchanged, and `seqfuse
predict` serves exactly what the parity checks proved.

Integrity: `read_manifest` checks an artifact's manifest.json, and `verify_artifact`
compares the sha256 of every file about to be loaded with the manifest's (written by the
exporter), so a truncated, corrupted or edited file is an ArtifactError naming it, never
an onnxruntime stack dump or a silently different model; `verify_settings` does the same
for the manifest's own sections that change answers (serving, config, decoding). The hashes catch accidents
(a partial copy, a disk error, an edit), not an attacker who can also rewrite the manifest.
Only ONNX files (protobuf: no code) are loaded here; the TorchScript and torch.export files
are programs (torch.export.load unpickles): load those only from a trusted source.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree
from torch import Tensor

from seqfuse.atomic import siblings
from seqfuse.decoding import greedy_loop


class ArtifactError(ValueError):
    """An artifact folder that cannot be served as exported: a missing, truncated,
    corrupted or modified file, or a manifest.json that does not describe it. The message
    names the file."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- the folders an export writes next to its output ----------------------------------
# An export builds `.{name}.tmp-{host}.{pid}-XXXX` next to the artifact folder `name` and
# swaps it in; where the swap is two renames, the previous folder is first set aside as
# `.{name}.old-{host}.{pid}-XXXX` (seqfuse.atomic: owned_prefix, siblings, recover).


def _interrupted_hint(art: Path) -> str:
    old = [p for p, _ in siblings(art, "old")]
    if not old:
        return ""
    return (f"; an interrupted export set the previous artifact aside as {old[0]}: exporting "
            f"to {art} again restores it first (or rename it back to {art.name})")


def read_manifest(artifact_dir: str | Path) -> dict:
    """An artifact's manifest.json, checked: parts with their files, and the sha256 of
    every file."""
    art = Path(artifact_dir)
    path = art / "manifest.json"
    if not path.is_file():
        if not art.exists():
            raise FileNotFoundError(f"{art} does not exist (no manifest.json){_interrupted_hint(art)}")
        raise FileNotFoundError(f"{art} is not an export artifact: it has no manifest.json")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from exc
    except RecursionError as exc:
        raise ArtifactError(f"{path} nests its JSON too deeply to be a manifest (corrupted?)") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    missing = [k for k in ("parts", "files") if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} has no {' or '.join(map(repr, missing))} section (truncated, or not "
                            "written by seqfuse export?)")
    parts, files = manifest["parts"], manifest["files"]
    if not isinstance(parts, dict) or not parts or not all(
            isinstance(p, dict) and isinstance(p.get("files"), dict) for p in parts.values()):
        raise ArtifactError(f"{path}: 'parts' must map each graph to its files")
    if not isinstance(files, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("sha256"), str) for f in files.values()):
        raise ArtifactError(f"{path}: 'files' must give the sha256 of every file")
    for key in ("variants", "serving", "config", "decoding"):
        if not isinstance(manifest.get(key, {}), dict):
            raise ArtifactError(f"{path}: {key!r} must be a JSON object")
    if not all(isinstance(v, dict) and isinstance(v.get("files", {}), dict)
               for v in manifest.get("variants", {}).values()):
        raise ArtifactError(f"{path}: 'variants' must map each variant to its files")
    return manifest


def verify_artifact(artifact_dir: str | Path, names, manifest: dict | None = None) -> dict:
    """Check that each file in `names` is the one exported: its size and sha256 equal
    manifest.json's. Raises ArtifactError naming the first file that is missing, unlisted
    or modified; returns the manifest."""
    art = Path(artifact_dir)
    manifest = read_manifest(art) if manifest is None else manifest
    listed = manifest["files"]
    for name in names:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"{art}/manifest.json names a file {name!r} outside the artifact folder")
        path = art / name
        entry = listed.get(name)
        if entry is None:
            raise ArtifactError(f"{path} is not listed in manifest.json: cannot verify it")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (manifest.json lists it)")
        size = entry.get("bytes")
        actual = path.stat().st_size
        if isinstance(size, int) and size != actual:
            raise ArtifactError(f"{path} was modified after export: sha256 mismatch ({actual} bytes, "
                                f"manifest.json says {size}: truncated?)")
        digest = sha256_file(path)
        if digest != entry["sha256"].lower():
            raise ArtifactError(f"{path} was modified after export: sha256 mismatch (manifest.json "
                                f"{entry['sha256'][:16]}..., file {digest[:16]}...)")
    return manifest


# The manifest's sections that change what a served model answers (how raw input is read,
# its labels, the model config, the decoding settings): their sha256 is recorded beside
# the files' and checked before serving, so an edit to them is caught like an edit to a file.
SETTINGS = ("serving", "config", "decoding")


def section_sha256(section) -> str:
    """sha256 of a manifest section's canonical JSON (sorted keys, no spaces), as it reads
    back from manifest.json (a round trip first: tuples become lists, keys strings)."""
    text = json.dumps(json.loads(json.dumps(section)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def settings_sha256(manifest: dict) -> dict[str, str]:
    """{section: sha256} of the SETTINGS sections, as the exporter records them."""
    return {key: section_sha256(manifest.get(key) or {}) for key in SETTINGS}


def verify_settings(artifact_dir: str | Path, manifest: dict, keys=SETTINGS) -> None:
    """Check that the manifest's `keys` sections are the ones exported: their sha256
    equals the manifest's "settings_sha256". Raises ArtifactError naming the section."""
    path = Path(artifact_dir) / "manifest.json"
    recorded = manifest.get("settings_sha256")
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{path} has no 'settings_sha256' to check its serving settings against "
                            "(exported by an older seqfuse: export it again)")
    for key in keys:
        try:
            digest = section_sha256(manifest.get(key) or {})
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: the {key!r} section cannot be checked: {exc}") from exc
        if recorded.get(key) != digest:
            raise ArtifactError(f"{path}: the {key!r} section was modified after export: sha256 "
                                f"mismatch (recorded {str(recorded.get(key))[:16]}..., now {digest[:16]}...)")


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, NoSuchFile...)
            raise ArtifactError(f"{path}: onnxruntime cannot load this ONNX file: {_first_line(exc)}") from exc


class OrtGraph:
    """One ONNX graph: call(*torch tensors) -> list of torch tensors (graph output order)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        # Nested model inputs (a state tuple) are the graph's inputs flattened in order.
        inputs = pytree.tree_leaves(list(inputs))
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} inputs "
                             f"{self.input_names}, got {len(inputs)}")
        return {n: (t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t))
                for n, t in zip(self.input_names, inputs)}

    def __call__(self, *inputs) -> list[Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, self.feeds(inputs))]


class AotiGraph:
    """One AOTInductor package (model.aoti.pt2): call(*torch tensors) -> list of torch
    tensors. Its compiled code calls seqfuse's ops, registered by `import seqfuse`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import seqfuse  # noqa: F401  (the package's graph calls torch.ops.seqfuse.*)

        self.path = Path(path)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            self.package = torch._inductor.aoti_load_package(str(path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # a truncated or corrupted archive
            raise ArtifactError(f"{path}: cannot load this AOTInductor package (truncated or "
                                f"corrupted?): {_first_line(exc)}") from exc

    def __call__(self, *inputs) -> list[Tensor]:
        # The compiled code reads its inputs with the strides they were traced with
        # (contiguous): a view (a transposed or sliced batch) would be read wrongly, so
        # every input is made contiguous (free when it already is).
        args = pytree.tree_map(lambda t: (t if isinstance(t, Tensor) else torch.as_tensor(np.asarray(t))).contiguous(),
                               list(inputs))
        with torch.inference_mode():
            out = self.package(*args)
        return pytree.tree_leaves(out) if isinstance(out, (list, tuple)) else [out]


# The runtimes an artifact can be served on (`seqfuse predict --runtime`): the manifest's
# file format each reads.
RUNTIMES = {"onnx": "onnx", "aoti": "aoti"}


class OrtModel:
    """An artifact's graphs run like the eager model: the ONNX graphs (float32 or a
    variant) in onnxruntime, or, with runtime="aoti", its AOTInductor packages."""

    # Artifacts written before manifests carried "decoding" come from the zoo's seq2seq,
    # whose <bos> and <eos> ids these are.
    _LEGACY_DECODING = {"bos_id": 2, "eos_id": 3}

    def __init__(self, graphs: dict[str, OrtGraph], config: dict | None = None,
                 decoding: dict | None = None):
        self.graphs = graphs
        self.config = config or {}
        # {"bos_id", "eos_id", "max_len"} of an encoder-decoder (ExportPlan.decoding)
        self.decoding = decoding or {}

    @classmethod
    def from_artifact(cls, artifact_dir: str | Path, variant: str | None = None,
                      threads: int | None = None, *, verify: bool = True,
                      runtime: str = "onnx") -> "OrtModel":
        """The artifact's float32 graphs, or a variant's. With verify (default) each graph
        file's sha256 is checked against manifest.json before it is loaded. runtime:
        "onnx" (onnxruntime), "aoti" (the AOTInductor packages; float32 only) or "auto"
        (the one the export measured fastest on its machine, manifest "runtime")."""
        art = Path(artifact_dir)
        manifest = read_manifest(art)
        if runtime == "auto":
            recorded = manifest.get("runtime")
            runtime = recorded.get("fastest", "onnx") if isinstance(recorded, dict) else "onnx"
            runtime = runtime if variant in (None, "float32") else "onnx"
        if not isinstance(runtime, str) or runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES) + ['auto']}, got {runtime!r}")
        if runtime == "aoti":
            if variant not in (None, "float32"):
                raise ValueError(f"variant {variant!r} is an ONNX model: serve it with runtime 'onnx'")
            names = {part: info["files"].get("aoti") for part, info in manifest["parts"].items()}
            missing_message = "no AOTInductor package for {}: export it with --formats ...,aoti"
        elif variant in (None, "float32"):
            names = {part: info["files"].get("onnx") for part, info in manifest["parts"].items()}
        else:
            names = manifest.get("variants", {}).get(variant, {}).get("files", {})
        if runtime == "onnx":
            known = ["float32"] + sorted(v for v in manifest.get("variants", {}) if v != "float32")
            missing_message = (f"variant {variant or 'float32'!r} has no ONNX file for {{}}; this "
                               f"artifact has variants {known}")
        missing = [part for part in manifest["parts"] if not names.get(part)]
        if missing:
            raise ValueError(f"{art}: " + missing_message.format(missing))
        if verify:
            verify_artifact(art, [names[part] for part in manifest["parts"]], manifest)
            verify_settings(art, manifest, ("config", "decoding"))
        graph_type = AotiGraph if runtime == "aoti" else OrtGraph
        graphs = {part: graph_type(art / names[part], threads) for part in manifest["parts"]}
        return cls(graphs, manifest.get("config", {}), manifest.get("decoding"))

    @classmethod
    def from_files(cls, files: dict[str, str | Path], config: dict | None = None,
                   decoding: dict | None = None) -> "OrtModel":
        return cls({part: OrtGraph(path) for part, path in files.items()}, config, decoding)

    def eval(self) -> "OrtModel":  # the task code calls model.eval()
        return self

    def __call__(self, *inputs):
        if "model" not in self.graphs:
            raise TypeError(f"this artifact has graphs {sorted(self.graphs)}: call greedy_decode")
        out = self.graphs["model"](*inputs)
        return out[0] if len(out) == 1 else tuple(out)

    @torch.no_grad()
    def greedy_decode(self, src_ids: Tensor, src_lengths: Tensor | None = None,
                      max_len: int | None = None) -> tuple[list[list[int]], Tensor]:
        """Greedy decoding in onnxruntime: the encoder graph once, then the one-step
        decoder graph per output token, fed its own state."""
        if not {"encoder", "decoder"} <= set(self.graphs):
            raise TypeError("greedy_decode needs an artifact with encoder and decoder graphs")
        if src_lengths is None:
            src_lengths = (src_ids != 0).sum(1).clamp(min=1)
        decoding = {**self._LEGACY_DECODING, **self.decoding}
        if max_len is None:
            max_len = decoding.get("max_len", self.config.get("max_decode_len", 24))
        memory, keys, state = self.graphs["encoder"](src_ids, src_lengths)
        decoder = self.graphs["decoder"]

        def step(prev, state):
            logits, state, weights = decoder(prev, state, memory, keys, src_lengths)
            return logits, state, weights

        return greedy_loop(step, state, src_ids.shape[0], max_len, int(decoding["bos_id"]),
                           int(decoding["eos_id"]))
