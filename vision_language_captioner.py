"""ARAS400k vision-language captions: Qwen3-VL sees the patch and is told its land-cover percentages.

Paper: M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language Models",
arXiv 2603.09625 (ARAS400k). The primary captioner of the dataset: Qwen3-VL-8B-Instruct
(`AutoModelForImageTextToText`) gets one user turn [text, image] per patch, where the text lists the
classes present with their percentages ("This remote sensing image contains the following land cover
distribution: Tree (41.5%), ... Based on this information, describe the scene in 1 or 2 concise
sentences focusing on spatial layout and dominant land use types."; the base prompt when no class is
present or the patch has no row), in batches of 32 with left padding, greedy, 100 new tokens, bf16 on
a GPU. See docs/aras400k.md, "Captions", for every difference from the reference script.

Commands:

    python vision_language_captioner.py --model ./Qwen3-VL-8B-Instruct \
        --images ARAS400k/synth/images --percentages ARAS400k/class_percentages/synth.csv \
        --out ARAS400k_synth_vision_language_qwen3_vl_8b.csv
    python vision_language_captioner.py --demo

The demo captions 8 seeded 64 x 64 demo patches with a tiny randomly initialised
Qwen3VLForConditionalGeneration (about 0.15 M parameters, a BPE tokenizer trained on three sentences):
the captions are gibberish, the pipeline is the real one. A re-run continues the CSV; failed
batches are named and retried. The demo generates 32 new tokens instead of 100 and took 11 s of
CPU (46 s in all on a 2-core machine under a load average of about 8). It ended with (images/s
depends on the CPU and its load):

    captioned 8 images (8 captions) in 20.7 s: 0.39 images/s -> results/vision_language_captioner/demo/...
"""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import cli
from common.aras400k import captions

MODEL_ID = "Qwen/Qwen3-VL-8B-Instruct"


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    captions.add_captioner_arguments(
        parser,
        model=MODEL_ID,
        images="ARAS400k/synth/images",
        percentages="ARAS400k/class_percentages/synth.csv",
        out="ARAS400k_synth_vision_language_qwen3_vl_8b.csv",
        batch_size=32,
    )
    captions.add_torch_arguments(parser)
    cli.add_shard_arguments(parser, "(image, caption number) jobs")
    add = parser.add_argument
    add("--max_new_tokens", type=int, default=100, help="New tokens per caption (greedy decoding).")
    add("--workers", type=int, default=16, help="Threads that read the images of a batch.")
    add(
        "--attn_implementation",
        default="sdpa",
        help="Attention kernel: sdpa, eager, or flash_attention_2 where flash-attn is installed.",
    )
    parser.demo_defaults(batch_size=4, max_new_tokens=32)
    return parser


# --help answers here, before torch loads.
cli.answer_help_early(get_args_parser, __name__)

from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from common import parallel, runs
from common.errors import cli_entry, require

# The arguments a re-run must share with the caption CSV it continues (with the prompt, dtype and
# effective generation settings, see main).
RESUME_SETTINGS = ("model",)
MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
IMAGE_TOKEN = "<|image_pad|>"
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    IMAGE_TOKEN,
    "<|video_pad|>",
]
# The Qwen chat format for text and image items (real checkpoints bring their own template).
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---- the reference's prompt and the Qwen3-VL inputs ----


def vision_language_prompt(shares) -> tuple[str, str]:
    """The reference's Qwen3-VL prompt and its id: the percentages, or the base prompt ("base") without."""
    classes = captions.present_classes(shares or {})
    if not classes:
        return captions.BASE_PROMPT, "base"
    return (
        "This remote sensing image contains the following land cover distribution: "
        f"{', '.join(classes)}. Based on this information, describe the scene in 1 or 2 concise sentences "
        "focusing on spatial layout and dominant land use types.",
        "percentages",
    )


def qwen_vl_inputs(tokenizer, image_processor, conversations, images, image_token: str = IMAGE_TOKEN) -> dict:
    """Model inputs for a batch of Qwen3-VL chats, assembled the way `Qwen3VLProcessor` does.

    The processor itself cannot be built without torchvision (its video processor needs it), so its
    steps are done here with the checkpoint's own tokenizer, chat template and (PIL) image
    processor: render the chat, expand each image placeholder to one token per merged patch
    (`grid_t * grid_h * grid_w / merge_size**2`), tokenize with left padding, and mark the image
    tokens in `mm_token_type_ids` (M-RoPE needs them). `tests/test_captioners.py` checks the result
    against the processor's own `apply_chat_template` for the same batch.
    """
    import torch

    texts = [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        for chat in conversations
    ]
    pixels = image_processor(images, return_tensors="pt")
    merge = image_processor.merge_size**2
    tokens_per_image = iter((pixels["image_grid_thw"].prod(-1) // merge).tolist())
    expanded = []
    for text in texts:
        first, *rest = text.split(image_token)
        expanded.append(first + "".join(image_token * next(tokens_per_image) + piece for piece in rest))
    encoded = tokenizer(
        expanded, padding=True, padding_side="left", return_tensors="pt", return_token_type_ids=False
    )
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": (encoded["input_ids"] == image_token_id).to(torch.long),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
    }


# ---- model, batches ----


def make_demo_model(folder) -> Path:
    """A tiny randomly initialised Qwen3-VL (text and vision towers, DeepStack) with its tokenizer and
    PIL image processor, saved as a local checkpoint folder."""
    folder = Path(folder)
    tokenizer = captions.demo_tokenizer(
        QWEN_SPECIAL_TOKENS, QWEN_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    token = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "out_hidden_size": 32,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=token(IMAGE_TOKEN),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # The real preprocessor's patch and merge sizes; a 64 x 64 patch becomes 4 x 4 patches, 4 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
    )
    image_processor.save_pretrained(folder)
    return folder


def load_model(model_path, device, dtype, attn_implementation):
    """The checkpoint's tokenizer (with chat template), PIL image processor and model, on `device`."""
    tokenizer = captions.load_pretrained(AutoTokenizer, model_path, "Qwen3-VL tokenizer")
    image_processor = captions.load_pretrained(
        AutoImageProcessor, model_path, "Qwen3-VL image processor", backend="pil"
    )
    model = captions.load_pretrained(
        AutoModelForImageTextToText,
        model_path,
        "Qwen3-VL model",
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    require(
        model.config.model_type in MODEL_TYPES,
        model_path,
        f"holds a '{model.config.model_type}' model",
        f"a Qwen3-VL checkpoint (model_type {' or '.join(MODEL_TYPES)})",
    )
    require(tokenizer.chat_template, model_path, "has no chat template", "a Qwen3-VL instruct checkpoint")
    return tokenizer, image_processor, model.to(device).eval()


def load_image(path) -> Image.Image:
    return Image.open(path).convert("RGB")


def caption_batch(batch, args, tokenizer, image_processor, model, percentages, pool):
    """Greedy captions for one batch of `(filename, caption number)`: [text, image] per user turn."""
    images = list(pool.map(load_image, [Path(args.images) / name for name, _ in batch]))
    prompts = [vision_language_prompt(percentages.get(name)) for name, _ in batch]
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}]
        for (text, _), image in zip(prompts, images, strict=True)
    ]
    inputs = qwen_vl_inputs(tokenizer, image_processor, conversations, images, IMAGE_TOKEN)
    texts = captions.generate_texts(
        model, inputs, tokenizer, max_new_tokens=args.max_new_tokens, do_sample=False
    )
    return [
        {"filename": name, "caption": text, "model": args.model, "prompt_id": prompt_id}
        for (name, _), (_, prompt_id), text in zip(batch, prompts, texts, strict=True)
    ]


@cli_entry
def main(args):
    captions.check_numbers(args)
    shard = parallel.shard_of(args)
    require(args.workers >= 1, "--workers", f"is {args.workers}", "at least 1")
    captions.seed_torch(args.seed)
    if args.demo:
        folder = captions.demo_paths(args, "vision_language_captioner")
        args.model = str(make_demo_model(folder / "model"))
    runs.print_args(args)

    # ---- inputs ----
    percentages = captions.read_percentages(args.percentages)
    names = captions.list_images(args.images)
    without_row = sum(name not in percentages for name in names)
    print(f"{len(names)} images, {without_row} without a percentage row (they get the base prompt)")
    if args.merge:  # the finished --shard parts, joined as one process writes them
        return captions.merge_parts(args, names)

    # ---- model ----
    device, dtype = captions.torch_device_and_dtype(args.device, args.dtype)
    started = time.perf_counter()
    tokenizer, image_processor, model = load_model(args.model, device, dtype, args.attn_implementation)
    captions.require_context_room(model, args.max_new_tokens)
    generation = captions.generation_record(model, do_sample=False, max_new_tokens=args.max_new_tokens)
    captions.require_distinct_captions(args.num_captions, generation)
    print(f"loaded {args.model} on {device} ({dtype}) in {time.perf_counter() - started:.1f} s")

    # ---- caption ----
    settings = {
        **captions.resume_settings(args, RESUME_SETTINGS),
        "prompt": "vision_language",
        "dtype": str(dtype),
        "generation": generation,
    }
    log = captions.shard_log(args, settings, shard)
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        make_captions = lambda batch: caption_batch(  # noqa: E731
            batch, args, tokenizer, image_processor, model, percentages, pool
        )
        captions.caption_missing_of(args, log, names, make_captions, shard)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
