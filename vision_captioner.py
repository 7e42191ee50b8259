"""ARAS400k vision-only captions: gemma-3-4b-it sees the patch and nothing else.

Paper: M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language Models",
arXiv 2603.09625 (ARAS400k). Gemma-3 (`AutoProcessor` + `AutoModelForImageTextToText`) gets one user
turn [text, image] with the base prompt ("Describe this remote sensing image in 1 or 2 concise
sentences, focusing on land use and key geographical features.") and 100 new tokens. As in the
reference, sampling is left to the checkpoint's GenerationConfig (gemma-3-4b-it samples with top_k
64, top_p 0.95), re-seeded per batch from --seed so a resumed run samples what an uninterrupted one
does; the effective settings are printed and recorded next to the CSV. See
docs/aras400k.md, "Captions", for every difference from the reference script.

Commands:

    python vision_captioner.py --model ./gemma-3-4b-it --images ARAS400k/train/images \
        --out ARAS400k_train_vision_gemma3_4b.csv
    python vision_captioner.py --demo

The demo captions 8 seeded 64 x 64 demo patches with a tiny randomly initialised
Gemma3ForConditionalGeneration (SigLIP tower, about 0.05 M parameters, a BPE tokenizer trained on
three sentences, the real checkpoint's sampling settings): gibberish captions, the real pipeline.
The demo generates 32 new tokens instead of 100 and took 20 s of CPU (55 s in all on a 2-core
machine under a load average of about 8). It ended with (images/s depends on the CPU and its load):

    captioned 8 images (8 captions) in 32.8 s: 0.24 images/s -> results/vision_captioner/demo/captions.csv
"""

from pathlib import Path

from common import cli
from common.aras400k import captions

MODEL_ID = "google/gemma-3-4b-it"


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    captions.add_captioner_arguments(
        parser,
        model=MODEL_ID,
        images="ARAS400k/train/images",
        percentages="",
        out="ARAS400k_train_vision_gemma3_4b.csv",
        batch_size=10,
    )
    captions.add_torch_arguments(parser)
    cli.add_shard_arguments(parser, "(image, caption number) jobs")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="New tokens per caption.")
    parser.demo_defaults(batch_size=4, max_new_tokens=32)
    return parser


# --help answers here, before torch loads.
cli.answer_help_early(get_args_parser, __name__)

from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
)

from common import parallel, runs
from common.errors import cli_entry, require

# The arguments a re-run must share with the caption CSV it continues (with the prompt, dtype and
# effective generation settings, see main): the seed and batch size fix what is sampled.
RESUME_SETTINGS = ("model", "seed", "batch_size")
GEMMA_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# The Gemma chat format for text and image items (real checkpoints bring their own template).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def make_demo_model(folder) -> Path:
    """A tiny randomly initialised Gemma-3 vision-language model with its processor, saved as a local
    checkpoint folder; its GenerationConfig samples like gemma-3-4b-it's (top_k 64, top_p 0.95)."""
    folder = Path(folder)
    tokenizer = captions.demo_tokenizer(
        GEMMA_SPECIAL_TOKENS,
        GEMMA_TEMPLATE,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    token = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        mm_tokens_per_image=4,
        image_token_index=token("<image_soft_token>"),
        boi_token_index=token("<start_of_image>"),
        eoi_token_index=token("<end_of_image>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    generation = model.generation_config
    generation.eos_token_id = [tokenizer.eos_token_id, token("<end_of_turn>")]
    generation.pad_token_id, generation.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample, generation.top_k, generation.top_p = True, 64, 0.95
    model.save_pretrained(folder)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        chat_template=GEMMA_TEMPLATE,
        image_seq_length=4,
    )
    processor.save_pretrained(folder)
    return folder


def load_model(model_path, device, dtype):
    """The checkpoint's processor (PIL image processor) and model, on `device`."""
    processor = captions.load_pretrained(AutoProcessor, model_path, "Gemma-3 processor", backend="pil")
    model = captions.load_pretrained(AutoModelForImageTextToText, model_path, "Gemma-3 model", dtype=dtype)
    require(
        model.config.model_type == "gemma3",
        model_path,
        f"holds a '{model.config.model_type}' model",
        "a Gemma-3 vision-language checkpoint (model_type gemma3)",
    )
    return processor, model.to(device).eval()


def caption_batch(batch, args, processor, model):
    """Captions for one batch of `(filename, caption number)` with the base prompt and the image."""
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": captions.BASE_PROMPT},
                    {"type": "image", "image": Image.open(Path(args.images) / name).convert("RGB")},
                ],
            }
        ]
        for name, _ in batch
    ]
    inputs = processor.apply_chat_template(
        conversations,
        tokenize=True,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        processor_kwargs={"padding": True, "padding_side": "left"},
    )
    texts = captions.generate_texts(model, inputs, processor.tokenizer, max_new_tokens=args.max_new_tokens)
    return [
        {"filename": name, "caption": text, "model": args.model, "prompt_id": "base"}
        for (name, _), text in zip(batch, texts, strict=True)
    ]


@cli_entry
def main(args):
    captions.check_numbers(args)
    shard = parallel.shard_of(args)
    captions.seed_torch(args.seed)
    if args.demo:
        folder = captions.demo_paths(args, "vision_captioner")
        args.model = str(make_demo_model(folder / "model"))
    runs.print_args(args)

    # ---- inputs and model ----
    names = captions.list_images(args.images)
    if args.merge:  # the finished --shard parts, joined as one process writes them
        return captions.merge_parts(args, names)
    device, dtype = captions.torch_device_and_dtype(args.device, args.dtype)
    processor, model = load_model(args.model, device, dtype)
    captions.require_context_room(model, args.max_new_tokens)
    # The reference leaves sampling to the checkpoint: record what that means for this one.
    generation = captions.generation_record(model, max_new_tokens=args.max_new_tokens)
    captions.require_distinct_captions(args.num_captions, generation)
    print(f"{len(names)} images; {args.model} on {device} ({dtype}); generation {generation}")

    # ---- caption ----
    settings = {
        **captions.resume_settings(args, RESUME_SETTINGS),
        "prompt": "base",
        "dtype": str(dtype),
        "generation": generation,
    }
    log = captions.shard_log(args, settings, shard)
    make_captions = lambda batch: caption_batch(batch, args, processor, model)  # noqa: E731
    captions.caption_missing_of(args, log, names, make_captions, shard)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
