"""ARAS400k text-only captions: Qwen3-4B-Instruct describes a patch from its land-cover percentages.

Paper: M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language Models",
arXiv 2603.09625 (ARAS400k). Qwen3-4B-Instruct-2507 (`AutoModelForCausalLM`) never sees the image:
the system turn is "You are a remote sensing expert." and the user turn "An image shows: Tree
(41.5%), ... . Describe the scene in 1 or 2 concise sentences focusing on dominant land use."
("unidentified land cover" when no class is present). Sampling as in the reference: temperature
0.7, top_p 0.8 (top_k and the rest from the checkpoint's GenerationConfig, recorded next to the
CSV), 100 new tokens, seeded by --seed. See docs/aras400k.md, "Captions", for every difference.

Commands:

    python text_captioner.py --model ./Qwen3-4B-Instruct-2507 \
        --percentages ARAS400k/class_percentages/synth.csv --out ARAS400k_synth_language_qwen3_4b.csv
    python text_captioner.py --demo

Without --images every row of the percentage CSV is captioned (as in the reference); with --images
only the images of that folder. The demo captions the 8 seeded demo patches' rows with a tiny
randomly initialised Qwen3ForCausalLM (about 0.03 M parameters, a BPE tokenizer trained on three
sentences, the real checkpoint's sampling settings), two captions each, 32 new tokens instead of
100; it took 20 s of CPU (56 s in all on a 2-core machine under a load average of about 8) and
ended with (images/s depends on the CPU and its load):

    captioned 8 images (16 captions) in 34.9 s: 0.23 images/s -> results/text_captioner/demo/captions.csv
"""

from pathlib import Path

from common import cli
from common.aras400k import captions

MODEL_ID = "Qwen/Qwen3-4B-Instruct-2507"


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    captions.add_captioner_arguments(
        parser,
        model=MODEL_ID,
        images="",
        percentages="ARAS400k/class_percentages/synth.csv",
        out="ARAS400k_synth_language_qwen3_4b.csv",
        batch_size=1,
    )
    captions.add_torch_arguments(parser)
    cli.add_shard_arguments(parser, "(image, caption number) jobs")
    add = parser.add_argument
    add("--max_new_tokens", type=int, default=100, help="New tokens per caption.")
    add("--temperature", type=float, default=0.7, help="Sampling temperature (the reference's value).")
    add("--top_p", type=float, default=0.8, help="Nucleus sampling mass (the reference's value).")
    parser.demo_defaults(batch_size=8, num_captions=2, max_new_tokens=32)
    return parser


# --help answers here, before torch loads.
cli.answer_help_early(get_args_parser, __name__)

from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from common import parallel, runs
from common.errors import cli_entry, require

# The arguments a re-run must share with the caption CSV it continues (with the prompt, dtype and
# effective generation settings, see main): the seed and batch size fix what is sampled.
RESUME_SETTINGS = ("model", "seed", "batch_size")
# The reference's system turn, word for word.
TEXT_SYSTEM_PROMPT = "You are a remote sensing expert."
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The Qwen chat format for system and user turns (real checkpoints bring their own template).
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text_messages(shares) -> list[dict]:
    """The reference's chat: the system line and the percentages ("unidentified land cover" when none)."""
    class_info = ", ".join(captions.present_classes(shares)) or "unidentified land cover"
    user = (
        f"An image shows: {class_info}. "
        "Describe the scene in 1 or 2 concise sentences focusing on dominant land use."
    )
    return [{"role": "system", "content": TEXT_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def make_demo_model(folder) -> Path:
    """A tiny randomly initialised Qwen3 causal LM with its tokenizer, saved as a local checkpoint
    folder; its GenerationConfig samples like Qwen3-4B-Instruct-2507's (top_k 20)."""
    folder = Path(folder)
    tokenizer = captions.demo_tokenizer(
        QWEN_SPECIAL_TOKENS, QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config)
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    generation.do_sample, generation.temperature, generation.top_p, generation.top_k = True, 0.7, 0.8, 20
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_model(model_path, device, dtype):
    """The checkpoint's tokenizer (left padding, so a batch's new tokens start at one column) and model."""
    tokenizer = captions.load_pretrained(AutoTokenizer, model_path, "Qwen3 tokenizer")
    tokenizer.padding_side = "left"
    model = captions.load_pretrained(AutoModelForCausalLM, model_path, "Qwen3 model", dtype=dtype)
    return tokenizer, model.to(device).eval()


def caption_batch(batch, args, tokenizer, model, percentages):
    """Sampled captions for one batch of `(filename, caption number)` from the percentages alone."""
    prompts = [
        tokenizer.apply_chat_template(
            text_messages(percentages[name]), tokenize=False, add_generation_prompt=True
        )
        for name, _ in batch
    ]
    texts = captions.generate_texts(
        model,
        tokenizer(prompts, return_tensors="pt", padding=True),
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [
        {"filename": name, "caption": text, "model": args.model, "prompt_id": "text_percentages"}
        for (name, _), text in zip(batch, texts, strict=True)
    ]


@cli_entry
def main(args):
    captions.check_numbers(args)
    shard = parallel.shard_of(args)
    require(args.temperature > 0, "--temperature", f"is {args.temperature}", "a positive number")
    require(0 < args.top_p <= 1, "--top_p", f"is {args.top_p}", "a probability mass in (0, 1]")
    captions.seed_torch(args.seed)
    if args.demo:
        folder = captions.demo_paths(args, "text_captioner")
        args.model = str(make_demo_model(folder / "model"))
    runs.print_args(args)

    # ---- inputs and model ----
    percentages = captions.read_percentages(args.percentages)
    names = captions.files_to_caption(args.images, percentages, True, args.percentages)
    if args.merge:  # the finished --shard parts, joined as one process writes them
        return captions.merge_parts(args, names)
    device, dtype = captions.torch_device_and_dtype(args.device, args.dtype)
    tokenizer, model = load_model(args.model, device, dtype)
    captions.require_context_room(model, args.max_new_tokens)
    generation = captions.generation_record(
        model,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"{len(names)} images; {args.model} on {device} ({dtype}); generation {generation}")

    # ---- caption ----
    settings = {
        **captions.resume_settings(args, RESUME_SETTINGS),
        "prompt": "text_percentages",
        "dtype": str(dtype),
        "generation": generation,
    }
    log = captions.shard_log(args, settings, shard)
    make_captions = lambda batch: caption_batch(batch, args, tokenizer, model, percentages)  # noqa: E731
    captions.caption_missing_of(args, log, names, make_captions, shard)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
