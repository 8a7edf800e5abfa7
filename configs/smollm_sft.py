"""SmolLM-135M fine-tuned into a chat model (SFT), as the original JaxPT does.

Import the checkpoint (weights, tokenizer.json and tokenizer_config.json) once, prepare a
chat dataset with its tokenizer, fine-tune, then talk to the result:

uv run python -m jaxpt.hf --to=jaxpt --source=HuggingFaceTB/SmolLM-135M --out=hf/smollm-135m
uv run python -m jaxpt.data.prepare --format=chat --dataset=HuggingFaceTB/smol-smoltalk \\
    --tokenizer=hf/smollm-135m --block_size=2048 --shard_tokens=20490000 \\
    --out=data/smol-smoltalk
uv run python launch.py --config=configs/smollm_sft.py --workdir=runs/smollm-sft
uv run python launch.py --config=configs/smollm_sft.py --workdir=runs/smollm-sft --mode=chat \\
    --system_prompt="You are a helpful assistant." --temperature=0.7 --top_k=50
uv run python launch.py --config=configs/smollm_sft.py:smoke --workdir=runs/sft-smoke  # CPU

The loss counts only the assistant's tokens (and their <|im_end|>). smol-smoltalk is the
chat data HuggingFaceTB made for its 135M and 360M models; the prepare command prints how many
conversations it holds (one row each): `train.steps` = 7500 batches of 128 is two epochs of
480k, so set it to 2 x conversations / 128. The schedule is alignment-handbook's SmolLM2 SFT
recipe (recipes/smollm2/sft/config_smol.yaml): lr 1e-3, cosine, warmup 10%, no weight decay.
--shard_tokens above makes the val split the first 10000 conversations.
"""

from jaxpt.config import parse_arg, preset_config, shrink_for_smoke

CHECKPOINT = "hf/smollm-135m"  # `python -m jaxpt.hf --to=jaxpt` of HuggingFaceTB/SmolLM-135M
DATA = "data/smol-smoltalk"  # `python -m jaxpt.data.prepare --format=chat` of smol-smoltalk


def get_config(arg: str | None = None):
    """``arg``: empty for the fine-tuning run (it needs SmolLM-135M's weights and a prepared
    chat dataset), ``smoke`` for a tiny CPU run of its settings (minutes on 2 cores)."""
    args = parse_arg(arg, smoke=False)
    config = preset_config("smollm", None)  # SmolLM-135M: vocab 49152, block 2048
    config.checkpoint.init_from = CHECKPOINT
    config.checkpoint.every_steps = 500
    config.data.dataset = DATA
    config.data.tokenizer = CHECKPOINT  # SmolLM's tokenizer.json and chat template

    config.train.steps = 7500  # two epochs of 480k conversations, 128 a step
    config.train.batch_size = 128
    # 4 micro-batches of 32, as alignment-handbook's accumulation: the 128 at once need 152 GiB
    # of a device (one H200 holds 105), 32 about 45
    config.train.grad_accum_steps = 4
    config.train.lr = 1e-3
    config.train.min_lr_ratio = 0.0  # cosine to zero
    config.train.warmup_steps = 750
    config.train.weight_decay = 0.0

    config.eval.every_steps = 500
    config.eval.batches = 20

    if args.smoke:  # SmolLM's architecture at smoke size, fresh, on the embedded corpus
        shrink_for_smoke(config)
        config.checkpoint.init_from = ""
        config.data.tokenizer = "gpt2"
        config.model.vocab_size = 50304
    return config
