"""SLM: Bridge the thin gap between speech and text foundation models
(Wang et al., Google, arXiv 2310.00230, ASRU 2023; no public code).

Idea. Freeze a speech foundation model and an instruction-tuned encoder-decoder LLM (mT0-MT XXL in
the paper); train only a thin adapter (156M parameters, about 1% of the total) that turns speech
frames into vectors the LLM's *encoder* reads beside the token embeddings of a text instruction.
Training mixes tasks (ASR, speech translation) with several instruction phrasings; the frozen LLM's
instruction following then carries over to instructions and tasks never seen with speech. Here
that is measured with a held-out phrasing per task and, when the data carries continuations, a
zero-shot continuation task.

Paper step                                            -> code
  adapter: shorten + "as few as two" transformer       -> Adapter (stack_frames, transformer)
           layers, output in the LLM's input space     -> Adapter.proj_out, Adapter.norm
  length: L frames -> ceil(L / k) vectors              -> Adapter.output_lengths
  input: [speech ; instruction] token embeddings       -> encoder_sample() (common.splice)
         fed to the frozen T5 encoder
  loss: decoder cross-entropy on the target text       -> slm_loss()
  multitask batches, instruction templates per task   -> draw_tasks(), instructions()
  zero-shot instructions at test time                 -> answer(), evaluate(), infer()
  metrics: WER (ASR), BLEU (AST)                       -> common.wer, common.corpus_bleu

Project choices (the record is silent or marks them [choice]): stack k = 4 frames of a 20 ms
encoder (80 ms per vector) -> Linear -> N pre-norm transformer layers with sinusoidal positions ->
Linear(-> d_model) -> LayerNorm whose scale starts at mean|e| / sqrt(d_model), so the vectors
have the norm of the LLM's token embeddings (HF T5 does not rescale inputs_embeds); padding
frames are zeroed before stacking, so a clip's vectors do not depend on its batch; speech first,
then the instruction, then the encoder's EOS (--order instruction-first for the other layout);
each item draws its task uniformly among the --tasks it has a target for, and a phrasing uniformly
among the task's trained phrasings; one phrasing of ASR and one of AST are held out of training
(data.TOY_T5_HELD_OUT; the continuation task has none held out); greedy decoding; "word
accuracy" = 1 - WER on the translation. The paper's sizes (USM, mT0-MT XXL, 156M adapter) are
replaced by the toy defaults. Not built: the paper's contextual-biasing ASR ("Transcribe the
speech. It may mention: ..."), dialog and QA (`--instruction` asks any of them of a trained
adapter); slm_loss is a sum, common.train divides by the target tokens.

Toy defaults [choice], measured on the toy valid set (200 held-out sentences, 1 CPU thread, the
built-in encoder and T5 of common.DEFAULT_SIZES): adapter width 128, 2 layers, 4 heads, FFN 512
(0.45M parameters, 45% of the toy total: the toy LLM is tiny, unlike the paper's 1%); AdamW,
batch 32, peak lr 2e-3, 30 warm-up steps then linear decay, 1000 steps: ASR WER 0.014 (held-out
phrasing 0.013), translation word accuracy 0.98 (held-out 0.98), BLEU 95, zero-shot continuation
word accuracy 0.95; 118 s of training, 122 s in all. Other settings (ASR WER trained / held-out,
translation word accuracy): batch 16, lr 1e-3, 600 steps: 0.38 / 0.34, 0.66 in 40 s; batch 16,
lr 2e-3, 2000 steps: 0.020 / 0.026, 0.98 in 132 s; batch 16, lr 3e-3, 1500 steps: 0.057 / 0.065,
0.95; batch 32, lr 2e-3, 1200 steps: 0.018 / 0.019, 0.99 in 142 s. The frozen T5 sets the
ceiling (asr_wer_text: its ASR WER from the transcript itself): with the earlier built-in T5
(2 heads, batch 32; held-out text accuracy 0.84, asr_wer_text 0.31) the batch 16 / lr 1e-3 /
600-step run reached ASR WER 0.66, with the current one (8 heads, batch 128; accuracy 1.00,
asr_wer_text 0.00) the same run reaches 0.38.
"""
import json
import math
import random
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg, speech, text

# task -> manifest field holding its target
TASKS = {"asr": "text", "ast": "translation", "continue": "continuation"}


def instructions(task, language):
    """The phrasings SLM trains with (several per task), for a target language."""
    return [s.replace(data.TOY_LANGUAGE, language) for s in data.TOY_T5_INSTRUCTIONS[task]]


def held_out(task, language):
    """One phrasing per task never used in SLM's training (None: the whole task is unseen)."""
    k = {"asr": 0, "ast": 1}.get(task)
    return None if k is None else data.TOY_T5_HELD_OUT[k].replace(data.TOY_LANGUAGE, language)


@dataclass
class SLMArgs(common.Args):
    stack: int = arg(4, "adapter: stack this many encoder frames into one vector (shortening)", min=1)
    width: int = arg(128, "adapter: transformer width", min=1)
    layers: int = arg(2, "adapter: transformer layers (paper: 'as few as two')", min=1)
    heads: int = arg(4, "adapter: attention heads", min=1)
    ffn: int = arg(512, "adapter: feed-forward width", min=1)
    dropout: float = arg(0.0, "adapter: dropout", min=0, max=1)
    order: str = arg("speech-first", "T5 encoder input: speech-first | instruction-first",
                     choices=["speech-first", "instruction-first"])
    tasks: str = arg("asr,ast", "training tasks, comma-separated, among " + ",".join(TASKS))
    language: str = arg(data.TOY_LANGUAGE, "target language named in the translation instructions")
    task: str = arg("asr", "task of --eval, and of --infer (its first trained phrasing)", choices=list(TASKS))
    prompt: str = arg("auto", "not for SLM: T5 reads [speech ; instruction] as it is (--order)",
                      choices=("auto", "chat", "blsp"))
    steps: int = arg(1000, "optimizer steps")
    batch_size: int = arg(32, "utterances per micro-batch (per process)")
    lr: float = arg(2e-3, "peak learning rate")
    warmup: int = arg(30, "warm-up steps")
    max_new_tokens: int = arg(32, "generation length limit")


# ----------------------------------------------------------------------------------------------
# The adapter: the only trained part

def sinusoid(n, d, device):
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / d))
    pe = torch.zeros(n, d, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class Adapter(nn.Module):
    """Encoder frames (B, T, d_enc) -> speech vectors (B, ceil(T/k), d_model) for the T5 encoder."""

    def __init__(self, d_enc, d_model, embed_norm, stack=4, width=128, layers=2, heads=4,
                 ffn=512, dropout=0.0):
        super().__init__()
        self.stack = stack
        self.proj_in = nn.Linear(stack * d_enc, width)
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj_out = nn.Linear(width, d_model)
        self.norm = nn.LayerNorm(d_model)
        with torch.no_grad():   # output norm ~ gamma * sqrt(d_model) = mean |e| of the token table
            self.norm.weight.fill_(embed_norm / math.sqrt(d_model))

    def output_lengths(self, lens):
        return (lens + self.stack - 1) // self.stack          # L -> ceil(L / k)

    def stack_frames(self, frames, lens):
        """(B, T, d) -> (B, ceil(T/k), k*d): vector t = [f_kt, ..., f_kt+k-1], padding zeroed."""
        B, T, d = frames.shape
        keep = torch.arange(T, device=frames.device)[None] < lens[:, None]
        x = frames * keep[..., None].to(frames.dtype)
        T2 = -(-T // self.stack) * self.stack
        x = F.pad(x, (0, 0, 0, T2 - T))
        return x.reshape(B, T2 // self.stack, self.stack * d), self.output_lengths(lens)

    def forward(self, frames, lens):
        x, lens = self.stack_frames(frames, lens)
        x = self.proj_in(x) + sinusoid(x.shape[1], self.proj_in.out_features, x.device).to(x.dtype)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= lens[:, None]
        x = self.transformer(x, src_key_padding_mask=pad)
        return self.norm(self.proj_out(x)), lens


def embed_norm(llm):
    """Mean L2 norm of the LLM's token embeddings (the scale speech vectors should have)."""
    return float(llm.get_input_embeddings().weight.float().norm(dim=-1).mean())


def speech_vectors(encoder, adapter, batch):
    """wave -> frozen encoder -> adapter -> one tensor of speech vectors per utterance."""
    with torch.no_grad():
        frames, lens = encoder(batch["wave"], batch["wave_lens"])
    vecs, _ = adapter(frames, lens)
    n = adapter.output_lengths(encoder.output_lengths(batch["wave_lens"]))   # on the host
    return [v[:k] for v, k in zip(vecs, n.tolist())]


# ----------------------------------------------------------------------------------------------
# Encoder input, loss and generation

def encoder_sample(x, instruction_ids, eos, order="speech-first"):
    """T5 encoder input as segments: [speech ; instruction] or [instruction ; speech], then EOS
    (T5 inputs end with EOS, as the tokenizer writes "{instruction} {sentence}</s>").
    x: a speech(vectors) or text(ids) segment."""
    ins = text(instruction_ids)
    return [x, ins, text([eos])] if order == "speech-first" else [ins, x, text([eos])]


def decoder_labels(target_ids, eos, device):
    """Targets + EOS, padded with -100 at the end -> (B, T_dec)."""
    rows = [ids + [eos] for ids in target_ids]
    labels = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        labels[b, :len(r)] = torch.tensor(r)
    return common.to_gpu(labels, device)


def padding_mask(sp):
    """The encoder input's padding as a (B, 1, 1, T) boolean mask: transformers hands it to SDPA
    as it is, for the encoder's attention and the decoder's cross-attention alike. Given the (B, T)
    mask, it would first read it back to learn whether it holds padding (a host sync, twice)."""
    return sp.attention_mask.bool()[:, None, None, :]


def slm_loss(llm, samples, target_ids, eos):
    """Decoder cross-entropy on target + EOS (summed over tokens, fp32) -> (loss, n, enc tokens).
    The encoder input is the splice of the samples' segments (attention mask 0 on padding); the
    splice's own labels stay unused: in an encoder-decoder the target is a separate sequence."""
    sp = common.splice(llm.get_input_embeddings(), samples)
    labels = decoder_labels(target_ids, eos, sp.inputs_embeds.device)
    with common.checkpointing(llm):                            # --grad-ckpt
        out = llm(inputs_embeds=sp.inputs_embeds, attention_mask=padding_mask(sp), use_cache=False,
                  decoder_input_ids=llm.prepare_decoder_input_ids_from_labels(labels=labels))
    # no labels= above: HF would add its own CE over all (B, T, V); fp32 only at the targets, whose
    # rows b*T+t are laid out on the host (no mask to read back)
    T = labels.shape[1]
    real = [b * T + t for b, ids in enumerate(target_ids) for t in range(len(ids) + 1)]
    real = common.to_gpu(torch.tensor(real), labels.device)
    loss = F.cross_entropy(out.logits.flatten(0, 1)[real].float(), labels.flatten()[real],
                           reduction="sum")                    # - sum_t log p(y_t | y_<t, speech, ins)
    return loss, len(real), sp.n_tokens


def step_flops(encoder, adapter, t5, stack):
    """-> flops(frames, enc_tokens, targets): a step's model FLOPs (common.matrices): the frozen
    speech encoder (2N a frame), the trained adapter (6N at frames / stack), the frozen T5 passing
    gradients back (4N): its encoder and the decoder's cross-attention keys/values at the encoder's
    tokens, the rest of the decoder and the output layer at the targets."""
    kv, skip = ("EncDecAttention.k.", "EncDecAttention.v."), ("embed", "relative_attention_bias")
    cross_kv = sum(p.numel() for k, p in t5.decoder.named_parameters() if any(s in k for s in kv))
    n_enc, n_ad, head = common.matrices(encoder), common.matrices(adapter), t5.lm_head.weight.numel()
    t5_enc, t5_dec = common.matrices(t5.encoder, skip) + cross_kv, common.matrices(t5.decoder, skip) - cross_kv
    return lambda frames, enc_tokens, targets: 2 * n_enc * frames + 6 * n_ad * frames / stack \
        + 4 * (t5_enc * enc_tokens + (t5_dec + head) * targets)


@torch.no_grad()
def generate_ids(llm, tok, samples, max_new_tokens=32):
    """Greedy decoding from the encoder's spliced embeddings -> token ids (cut at EOS)."""
    sp = common.splice(llm.get_input_embeddings(), samples)
    eos = common.eos_ids(llm, tok)
    out = llm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                       eos_token_id=eos, pad_token_id=tok.pad_token_id,
                       decoder_start_token_id=llm.config.decoder_start_token_id)
    rows = [r[1:] for r in out.tolist()]                      # drop the decoder start token
    return [r[:next((i for i, t in enumerate(r) if t in eos), len(r))] for r in rows]


def answer(llm, tok, samples, max_new_tokens=32):
    return [tok.decode(o, skip_special_tokens=True).strip()
            for o in generate_ids(llm, tok, samples, max_new_tokens)]


def ids_of(tok, s):
    return tok(s, add_special_tokens=False).input_ids


def with_task_fields(items):
    """A manifest line may carry any subset of the targets: missing ones become None (so that
    every item of a batch has the same fields)."""
    for it in items:
        for f in TASKS.values():
            it.setdefault(f, None)
    return items


def draw_tasks(batch, tasks, language, rng=random):
    """Multitask batch: each item draws a task among those it has a target for, and one of the
    task's trained phrasings -> [(task, instruction, target text)]."""
    out = []
    for k in range(len(batch["text"])):
        have = [t for t in tasks if batch.get(TASKS[t], [None] * (k + 1))[k]]
        if not have:
            raise data.DataError(f"{batch['where'][k]}: no target for the tasks {','.join(tasks)}")
        t = rng.choice(have)
        out.append((t, rng.choice(instructions(t, language)), batch[TASKS[t]][k]))
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation: WER, BLEU, held-out phrasing and zero-shot tasks

def scores(task, refs, hyps):
    w = common.wer(refs, hyps)
    if task == "asr":
        return dict(wer=w)
    return dict(bleu=common.corpus_bleu(refs, hyps), word_acc=max(0.0, 1 - w))


@torch.no_grad()
def evaluate(encoder, adapter, llm, tok, items, args, device, tasks, trained=(), extra=None):
    """For each task whose target the items carry: answers from speech with the trained phrasings
    (item i gets phrasing i mod n), with the held-out phrasing, with `extra` (any instruction), and
    the frozen T5's own answers from the transcript (its native "{instruction} {text}" input).
    A task not in `trained` is zero-shot: all its phrasings are unseen."""
    eos = common.eos_ids(llm, tok)[0]
    runs = {}                                       # (task, kind) -> (refs, hyps)
    adapter.eval()
    i0 = 0
    for batch in common.batches(items, args):
        batch = common.to_device(batch, device)
        with common.autocast(device):
            vecs = speech_vectors(encoder, adapter, batch)
        for task in tasks:
            have = [k for k, t in enumerate(batch.get(TASKS[task], [])) if t]
            if not have:
                continue
            refs = [batch[TASKS[task]][k] for k in have]
            phr = instructions(task, args.language)
            kinds = {"trained" if task in trained else "zeroshot":
                     [phr[(i0 + k) % len(phr)] for k in have]}
            if task in trained and held_out(task, args.language):
                kinds["heldout"] = [held_out(task, args.language)] * len(have)
            if extra:
                kinds["instruction"] = [extra] * len(have)
            for kind, ins in kinds.items():
                samples = [encoder_sample(speech(vecs[k]), ids_of(tok, s), eos, args.order)
                           for k, s in zip(have, ins)]
                with common.autocast(device):
                    hyps = answer(llm, tok, samples, args.max_new_tokens)
                runs.setdefault((task, kind), ([], []))[0].extend(refs)
                runs[(task, kind)][1].extend(hyps)
            prompts = [text(tok(f"{phr[0]} {batch['text'][k]}").input_ids) for k in have]
            with common.autocast(device):
                hyps = answer(llm, tok, [[p] for p in prompts], args.max_new_tokens)
            runs.setdefault((task, "text"), ([], []))[0].extend(refs)
            runs[(task, "text")][1].extend(hyps)
        i0 += len(batch["text"])
    res = {}
    for (task, kind), (refs, hyps) in runs.items():
        for name, v in scores(task, refs, hyps).items():
            res[f"{task}_{name}" + ("" if kind in ("trained", "zeroshot") else "_" + kind)] = v
    return res


# ----------------------------------------------------------------------------------------------
# Inference and evaluation of a trained adapter

def task_list(tasks):
    """--tasks a,b -> [a, b], each one of TASKS."""
    names = tasks.split(",")
    if not names or any(t not in TASKS for t in names):
        raise common.UserError(f"--tasks {tasks}: choose among {','.join(TASKS)}")
    return names


def build(args, device):
    if args.width % args.heads:
        raise common.UserError(f"--heads {args.heads} does not divide the adapter's --width {args.width}")
    encoder = common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s)
    llm, tok = common.load_llm(args.llm, device, kind="seq2seq", grad_ckpt=args.grad_ckpt)
    if not llm.config.is_encoder_decoder:
        raise common.UserError(f"--llm {args.llm}: not an encoder-decoder (T5-family) model")
    adapter = Adapter(encoder.dim, llm.config.d_model, embed_norm(llm), args.stack, args.width,
                      args.layers, args.heads, args.ffn, args.dropout).to(device)
    return encoder, adapter, llm, tok


def load_run(args, device):
    """--ckpt run directory -> (encoder, adapter, llm, tok); the run's config sets the models and
    sizes, and the input order, tasks, language, generation length and the validation's
    --instruction unless given here (a zero-shot test)."""
    shape = ("encoder_layer", "whisper_30s", "stack", "width", "layers", "heads", "ffn")
    free = ("order", "tasks", "language", "max_new_tokens", "instruction")
    ck = common.take_run_config(args, args.ckpt, "slm", ("llm", "encoder") + shape + free, fixed=shape, free=free)
    task_list(args.tasks)
    encoder, adapter, llm, tok = build(args, device)
    common.load_trainable(adapter, ck).eval()
    return encoder, adapter, llm, tok


def infer(args, device):
    encoder, adapter, llm, tok = load_run(args, device)
    eos = common.eos_ids(llm, tok)[0]
    if args.infer:
        batch = common.infer_batch(args, encoder, device)
        ins = args.instruction if common.given(args, "instruction") else instructions(args.task, args.language)[0]
        with torch.no_grad(), common.autocast(device):
            v = speech_vectors(encoder, adapter, batch)[0]
            print(answer(llm, tok, [encoder_sample(speech(v), ids_of(tok, ins), eos, args.order)],
                         args.max_new_tokens)[0])
    if args.eval:
        items = with_task_fields(common.eval_items(args, encoder))
        if not any(it.get(TASKS[args.task]) for it in items):
            raise common.UserError(f"--eval {args.eval}: no item has a '{TASKS[args.task]}' field "
                                   f"(needed for --task {args.task})")
        res = evaluate(encoder, adapter, llm, tok, items, args, device, [args.task],
                       args.tasks.split(","), args.instruction)
        print(json.dumps(common.json_safe(res), indent=1))


# ----------------------------------------------------------------------------------------------

@common.guard
def main(argv=None):
    args = common.parse_args(SLMArgs, argv, method="slm")
    if common.typed(args, "prompt"):
        raise common.UserError("--prompt is for the causal LLMs' prompt formats: SLM's T5 reads "
                               "[speech ; instruction] as it is (--order sets their order)")
    if common.typed(args, "task") and not args.ckpt:
        raise common.UserError("--task is the task of --ckpt's --eval and --infer: training takes --tasks")
    device, rank, world = common.setup(args)
    if args.ckpt:
        return infer(args, device)
    args.out = args.out or args.resume or "runs/slm"            # (--resume DIR continues in DIR)
    tasks = task_list(args.tasks)
    encoder, adapter, llm, tok = build(args, device)
    common.compile_adapter(adapter, args)
    train_items, valid_items = common.manifests(args, encoder)
    with_task_fields(train_items + valid_items)
    bad = next((it for it in train_items if not any(it[TASKS[t]] for t in tasks)), None)
    if bad:
        raise data.DataError(f"{bad['where']}: no target for the tasks {args.tasks}")
    never = [t for t in tasks if not any(it[TASKS[t]] for it in train_items)]
    if never:           # (the run's config then says what it trained: --ckpt reports that)
        tasks = [t for t in tasks if t not in never]
        if rank == 0:
            print(f"slm: warning: no training utterance has a {' or '.join(repr(TASKS[t]) for t in never)} "
                  f"field: --tasks {args.tasks} trains {','.join(tasks)} only", file=sys.stderr)
        args.tasks = ",".join(tasks)
    eos = common.eos_ids(llm, tok)[0]
    n_adapter, n_total = common.count_params(adapter, True), common.count_params(
        adapter) + common.count_params(encoder) + common.count_params(llm)
    if rank == 0:
        print(f"slm: adapter {n_adapter / 1e6:.2f}M trainable parameters of {n_total / 1e6:.2f}M in "
              f"all ({n_adapter / n_total:.1%}; paper: 156M, about 1%)")

    flops = step_flops(encoder, adapter, llm, args.stack)

    def step_fn(batch):
        vecs = speech_vectors(encoder, adapter, batch)
        drawn = draw_tasks(batch, tasks, args.language)
        samples = [encoder_sample(speech(v), ids_of(tok, ins), eos, args.order)
                   for v, (_, ins, _) in zip(vecs, drawn)]
        loss, n, tokens = slm_loss(llm, samples, [ids_of(tok, tgt) for _, _, tgt in drawn], eos)
        return loss, n, dict(tokens=tokens + n, flops=flops(encoder.frames, tokens, n))

    eval_tasks = [t for t in TASKS if any(it.get(TASKS[t]) for it in valid_items)]

    def valid_fn(step):
        res = evaluate(encoder, adapter, llm, tok, valid_items, args, device, eval_tasks, tasks, args.instruction)
        adapter.train()
        return res

    res = common.train(args, adapter, step_fn, train_items, device, rank, world, valid_fn,
                       method="slm", model_fields=("llm", "encoder", "encoder_layer", "whisper_30s",
                                                   "stack", "width", "layers", "heads", "ffn", "order"))
    if rank == 0:
        show_sample(encoder, adapter, llm, tok, valid_items, args, device, tasks)
        print("final: " + json.dumps(common.json_safe(res)))


def show_sample(encoder, adapter, llm, tok, items, args, device, tasks):
    """A transcription and a translation of the same held-out spoken sentence."""
    item, wave = data.first_loadable(items)
    batch = common.to_device(data.collate([dict(item, wave=wave)]), device)
    eos = common.eos_ids(llm, tok)[0]
    adapter.eval()
    with torch.no_grad(), common.autocast(device):
        v = speech_vectors(encoder, adapter, batch)[0]
        print(f"transcript:  {item['text']}")
        for task in TASKS:
            if not item.get(TASKS[task]):
                continue
            for ins in instructions(task, args.language)[:1] + [held_out(task, args.language)]:
                if ins:
                    out = answer(llm, tok, [encoder_sample(speech(v), ids_of(tok, ins), eos,
                                                           args.order)], args.max_new_tokens)[0]
                    kind = ("held-out" if ins == held_out(task, args.language) else "trained") \
                        if task in tasks else "zero-shot task"
                    print(f"{task} [{kind}] {ins!r} -> {out!r}   (reference: {item[TASKS[task]]!r})")


if __name__ == "__main__":
    main()
