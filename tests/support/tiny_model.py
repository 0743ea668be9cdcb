"""Make a tiny random-weight Llama model that real vLLM (CPU build) can serve, without any download.

The weights are random, so the text is gibberish; the protocol, streaming, usage counts and metrics
are vLLM's own. Needs transformers, tokenizers and torch (the vLLM venv has them):

    .venv-vllm/bin/python tests/support/tiny_model.py [DIR]    # default DIR: .cache/tiny-model
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / ".cache" / "tiny-model"

# Written last: its presence means the directory is complete. Bump the recipe to rebuild old caches.
COMPLETE_MARKER = ".tiny-model-complete"
RECIPE = {
    "recipe": 3,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 64,  # the CPU attention kernels reject small head sizes such as 16
    "num_key_value_heads": 1,
    "intermediate_size": 256,
    "vocab_size": 400,
    # Long enough that a generation an abort should cut short outlasts any abort by far, even on a fast host
    # (one made 3,277 tokens in 1.5 s), while its KV cache stays small (1 KiB a token).
    "max_position_embeddings": 65536,
    "seed": 0,
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part.get('text', '') }}{% endfor %}{% endif %}"
    "{{ '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A gateway forwards each request to the model server that serves the named model.",
    "Hello! How are you today? I am fine, thank you, and you?",
    "Streaming responses arrive token by token as server-sent events.",
    "Every API key has a name, a rate limit and a record of its usage.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1024 and 32768 appear in configs.",
    "def main(): return {'model': 'tiny', 'messages': [], 'max_tokens': 16}",
    "System: you are a helpful assistant. User: tell me a story about the sea.",
    "The weather is sunny, the sea is calm, and the boats sail into the harbour.",
    "Errors carry a status code, a type and a message that explains what went wrong.",
]


def is_complete(directory: str | Path) -> bool:
    marker = Path(directory) / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()) == RECIPE
    except (OSError, ValueError):
        return False


def _train_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=RECIPE["max_position_embeddings"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _build(directory: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(RECIPE["seed"])
    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=RECIPE["hidden_size"],
        num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"],
        head_dim=RECIPE["head_dim"],
        num_key_value_heads=RECIPE["num_key_value_heads"],
        intermediate_size=RECIPE["intermediate_size"],
        max_position_embeddings=RECIPE["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)


def make_tiny_model(directory: str | Path = DEFAULT_DIR) -> str:
    """Create the model in `directory` (or reuse a complete one there) and return its path."""
    target = Path(directory).resolve()
    if is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap it in, so an interrupted run never leaves a half model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=target.parent))
    staging.chmod(0o755)
    try:
        _build(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps(RECIPE))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return str(target)


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv) or len(argv) > 1:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    print(make_tiny_model(argv[0] if argv else DEFAULT_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
