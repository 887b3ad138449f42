"""Throughput and memory of the training steps, against the official recipes' design choices.

Each method's full training step (encoder forward, adapter, LLM forward and backward, AdamW) runs on
synthetic batches whose durations follow a LibriSpeech-like spread (2-20 s, log-normal around 12 s),
with models built from config at a chosen scale (random weights: speed does not depend on them):

    --scale tiny    a 2-layer 64-d Whisper-style encoder, a 2-layer 64-d Llama and T5 (CPU, seconds)
    --scale small   a Whisper-base-sized encoder (6 x 512), a ~135M Llama (SmolLM2-135M shape) and,
                    for SLM, a Flan-T5-base shape (248M)
    --scale paper   a Whisper-small-sized encoder (12 x 768), a 7B Llama-2 shape and, for SLM, the
                    paper's mT0-XXL shape (13B) (GPU only); --encoder large-v2 gives BLSP-KD's
                    encoder shape (32 x 1280) instead

Each spoken clip has a text of 3 words per second (toy words, one token each: what SSR's aligner
and tokenizer read; BLSP-KD's transcript and SLM's target have as many tokens) and BLSP's
48-token continuation (and its end token).

Reported per variant: samples/s, audio seconds per second, LLM tokens/s, padding fraction, peak memory
(CUDA: max_memory_allocated; CPU: the process's peak RSS, each variant in its own process unless
--in-process), the rise of memory during the steps above the built models and optimizer ("step"),
the host syncs in a step's forward ("syncs": where the CPU would wait for the GPU, counted by HostSyncs on any device:
SSR needs one, for its alignment on the CPU; the others none),
and, on CUDA, the syncs CUDA itself reports over a whole step (torch.cuda.set_sync_debug_mode) and
MFU = model FLOPs / time / bf16 peak, counting 2N FLOPs per token for frozen forward-only passes
(the encoder, BLSP-KD's teacher pass), 4N for frozen layers that pass gradients back (the LLM's
student pass: forward + input gradients), 6N for trained weights (the adapter, counted for
each layer at its own rate: BLSP's convolutions at T/2, T/4, T/8, BLSP-KD's CFormer after CIF and
SSR's last connector layer at the speech vectors; SSR stage 2's LoRA), N = parameters of the
matrices the token goes through (common.matrices); the output layer counts only at the positions
where logits are computed; T5's cross-attention keys and values count at the encoder's tokens.
Only real frames and tokens count (padding, and blsp-30s's 30 s, are waste: MFU shows them);
attention's own products (QK^T, AV: about 1% of a 7B step at 200 positions), norms and
activations are left out. Each method's step_flops holds its count, which its script logs too.

Variants, measured with the same models in the same run (the official choices reported as ratios):
    blsp          real-length encoder, length-bucketed batches (this project)
    blsp-30s      the encoder run on clips padded to 30 s, cropped after (the released BLSP code;
                  --whisper-30s)
    blsp-nobucket real length, but batches drawn at random (no length buckets)
    blsp-ckpt     blsp with activation checkpointing of the frozen LLM (--grad-ckpt)
    blsp-compile  blsp with the adapter compiled (--compile: torch.compile, dynamic shapes; it
                  compiles in two untimed warm-up steps, of about 10 s and 12 s clips)
    blsp-noprefix blsp with the instruction run for every clip, as the released code does (this
                  project runs a prefix that every sample shares once: common.hidden_states)
    blsp-compile-llm  blsp-noprefix with each layer of the frozen LLM compiled (torch.compile,
                  dynamic shapes; one compile serves all the layers): it fuses the element-wise
                  kernels (RMSNorm, rotary, gating) around the matrix products; not an option of
                  the scripts yet
    blsp-fused-norm  blsp with the frozen LLM's RMSNorms as one F.rms_norm call each (torch 2.11 has
                  fused CUDA kernels for its forward and backward; HF's LlamaRMSNorm runs about 7
                  kernels forward, more backward); not an option of the scripts yet
    blsp-1s       blsp with each batch's audio padded to a whole second: at most 19 encoder and
                  adapter lengths over the spread, so per-shape convolution plans are reused (with
                  --again: is the cost of new lengths in the convolutions?)
    kd            BLSP-KD stage 1 (CFormer; teacher and student passes; length, response and input
                  KL) with blsp_kd.kd_losses as it is: logits at the loss positions only, one
                  checkpointed chunk of rows at a time (common.per_row_loss)
    kd-ckpt       kd with --grad-ckpt
    kd2           BLSP-KD stage 2: kd's step with Partial LoRA (rank 16) trained too
    kd-select     the same KL terms from fp32 logits at all the loss positions at once
    kd-full       the same KL terms from the fp32 logits of the whole sequence of both passes, kept
                  until the step ends (as the output of an llm(...) call in a training step keeps them)
    ssr1          SSR stage 1: frozen aligner, CTC forced alignment of the text (on the CPU, as in
                  ssr.py), connector (4 layers at the LLM's width), distillation; the LLM is not run
                  ("tokens": the SSR vectors distilled)
    ssr1-ckpt     ssr1 with --grad-ckpt (the connector's layers recomputed in the backward)
    ssr2          SSR stage 2: the SSR vectors (frozen connector) -> next-token prediction, LoRA
    slm           SLM: stacking adapter, [speech ; instruction] into the frozen T5 encoder, decoder
                  cross-entropy on a transcript-long target ("tokens": T5 encoder + decoder)
On CPU the peak RSS also counts memory that glibc keeps after tensors are freed; --live-memory runs
each variant with MALLOC_MMAP_THRESHOLD_=1 MiB, so that freed tensors go back to the system and the
peak RSS follows live memory, as max_memory_allocated does on CUDA (large allocations then cost page
faults: slower). Tokens/s counts the LLM's real tokens (teacher and student passes for BLSP-KD).
Frozen models run in bf16 with bf16 autocast on CUDA and in fp32 on CPU, as in the scripts; --precision
bf16 runs the CPU in bf16 too (fast on CPUs with AVX512-BF16 or AMX).
Usage: python bench.py --scale tiny [--device cuda] [--steps 5] [--vocab 151936] [--batch 16] [--live-memory]
                       [--precision bf16] [--variants blsp,kd] [--json rows.json] [--profile] [--again]
                       [--in-process]
"""
import argparse
import collections
import contextlib
import copy
import json
import os
import random
import resource
import subprocess
import sys
import time
import traceback
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import blsp
import blsp_kd
import common
import data
import slm
import ssr

SCALES = dict(
    tiny=dict(enc=dict(d=64, layers=2, heads=2), llm=dict(d=64, layers=2, heads=2, ffn=128), batch=4,
              cformer=dict(pre_layers=1, post_layers=1, heads=2), connector=dict(layers=1),
              t5=dict(d=64, layers=2, heads=4, ffn=128, vocab=2000),
              slm=dict(width=64, layers=2, heads=2, ffn=128)),
    small=dict(enc=dict(d=512, layers=6, heads=8), llm=dict(d=576, layers=30, heads=9, ffn=1536), batch=8,
               cformer=dict(pre_layers=4, post_layers=4, heads=8), connector=dict(layers=4),
               t5=dict(d=768, layers=12, heads=12, ffn=2048, vocab=32128),         # Flan-T5-base
               slm=dict(width=512, layers=2, heads=8, ffn=2048)),
    paper=dict(enc=dict(d=768, layers=12, heads=12), llm=dict(d=4096, layers=32, heads=32, ffn=11008),
               batch=16, cformer=dict(pre_layers=4, post_layers=4, heads=8), connector=dict(layers=4),
               t5=dict(d=4096, layers=24, heads=64, ffn=10240, vocab=250112),      # mT0-XXL (13B)
               slm=dict(width=2048, layers=2, heads=16, ffn=8192)))                 # ~115M
VARIANTS = ("blsp", "blsp-30s", "blsp-nobucket", "blsp-noprefix", "blsp-ckpt", "blsp-compile", "blsp-compile-llm",
            "blsp-fused-norm", "blsp-1s", "kd", "kd-ckpt", "kd-select", "kd-full", "kd2", "ssr1", "ssr1-ckpt",
            "ssr2", "slm")
WORDS = sorted(data.toy_vocabulary())                  # the spoken texts' words
PROMPT, AFTER, CONTINUATION, EOS = list(range(5, 40)), list(range(40, 45)), 48, 2   # prompt pieces; targets


def durations(n, rng):
    """LibriSpeech-like: log-normal around 12 s, clipped to 2-20 s."""
    return [min(20.0, max(2.0, rng.lognormvariate(2.45, 0.45))) for _ in range(n)]


ENCODERS = {"large-v2": dict(d=1280, layers=32, heads=20)}     # BLSP-KD's encoder (635M)


def build_encoder(e, device):
    """A Whisper-style encoder of shape e = dict(d, layers, heads), random weights."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    torch.manual_seed(0)
    wcfg = WhisperConfig(num_mel_bins=80, d_model=e["d"], encoder_layers=e["layers"],
                         encoder_attention_heads=e["heads"], encoder_ffn_dim=4 * e["d"], decoder_layers=1,
                         decoder_attention_heads=e["heads"], decoder_ffn_dim=64, max_source_positions=1500,
                         max_target_positions=16, vocab_size=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)
    whisper = WhisperModel(wcfg)
    enc = common.SpeechEncoder(whisper.encoder, "whisper", WhisperFeatureExtractor(feature_size=80).mel_filters)
    enc = common.freeze(enc).to(device=device, dtype=common.frozen_dtype(device))
    enc.mel_filters = enc.mel_filters.float()
    return enc


def build_llm(scale, vocab, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    l = SCALES[scale]["llm"]
    lcfg = LlamaConfig(vocab_size=vocab, hidden_size=l["d"], num_hidden_layers=l["layers"],
                       num_attention_heads=l["heads"], num_key_value_heads=l["heads"],
                       intermediate_size=l["ffn"], tie_word_embeddings=False)
    with torch.device(device):                            # a 7B model: built in place, in its dtype
        return common.freeze(LlamaForCausalLM._from_config(lcfg, dtype=common.frozen_dtype(device),
                                                           attn_implementation="sdpa"))


def build_t5(scale, device):
    from transformers import T5Config, T5ForConditionalGeneration
    t = SCALES[scale]["t5"]
    cfg = T5Config(vocab_size=t["vocab"], d_model=t["d"], d_kv=64 if t["d"] >= 512 else 16, d_ff=t["ffn"],
                   num_layers=t["layers"], num_decoder_layers=t["layers"], num_heads=t["heads"],
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    with torch.device(device):
        t5 = T5ForConditionalGeneration._from_config(cfg, dtype=common.frozen_dtype(device))
        # transformers 5 ties T5's output layer to the embedding when built from a config (it unties
        # when a file holds both, as Flan-T5's and mT0's do): give it its own, as those models have
        t5.lm_head.weight = torch.nn.Parameter(t5.lm_head.weight.detach().clone())
    return common.freeze(t5)


def batches(variant, n_batches, batch, rng):
    """The same n_batches x batch clips for every variant (so throughputs compare), grouped by
    length buckets or at random; after warm-up batches of about 10 s clips (and about 12 s clips for
    a compiled variant, whose dynamic-shape compile recompiles once), not timed."""
    durs = durations(n_batches * batch, rng)
    if variant == "blsp-nobucket":
        idx = list(range(len(durs)))
        rng.shuffle(idx)
        out = [idx[i:i + batch] for i in range(0, len(idx), batch)]
    else:
        out = data.BucketBatchSampler(durs, batch, seed=0).batches()
    real = sum(durs) * 16000
    padded = sum(batch_samples([durs[i] for i in b], variant.endswith("-1s")) * len(b) for b in out)
    # one clip shorter: a padded batch, as the timed ones (a compiled HF layer compiles apart
    # for batches without padding, where the attention mask is None)
    warm = [[10.0] * (batch - 1) + [9.0]] + ([[12.0] * (batch - 1) + [11.0]] if "-compile" in variant else [])
    return warm, [[durs[i] for i in b] for b in out], 1 - real / padded


def batch_samples(durs, whole_seconds=False):
    """Width of a batch's padded audio in 16 kHz samples: its longest clip (or, whole_seconds, that
    rounded up to a whole second)."""
    longest = max(int(d * 16000) for d in durs)
    return -(-longest // 16000) * 16000 if whole_seconds else longest


def make_batch(durs, vocab, rng, device, whole_seconds=False):
    """Random audio of the given durations (whole_seconds: padded to a whole second); per clip a
    spoken text of 3 words per second (toy words: one token each, for SSR's aligner) and a 48-token
    continuation."""
    lens = torch.tensor([int(d * 16000) for d in durs])                # on the host, as data.collate's
    wave = torch.randn(len(durs), batch_samples(durs, whole_seconds), device=device) * 0.1
    return dict(wave=wave, wave_lens=lens, durs=durs,
                text=[" ".join(rng.choice(WORDS) for _ in range(max(1, int(3 * d)))) for d in durs],
                response=torch.randint(100, vocab, (len(durs), CONTINUATION)).tolist())


def whisper_frames(samples):
    """Encoder frames of a clip of this many 16 kHz samples: 10 ms mel frames, conv stride 2."""
    return (samples // 160 - 1) // 2 + 1


def encoder_frames(batch):
    """The clips' real encoder frames (what model FLOPs count: padding, and blsp-30s's 30 s, are
    waste, which MFU then shows)."""
    return int(whisper_frames(batch["wave_lens"]).sum())


# ----------------------------------------------------------------------------------------------
# One maker per method: -> (trained module, step(batch) -> (loss, LLM tokens, model FLOPs)); the
# FLOPs come from each method's own step_flops, the count its training script logs

def blsp_method(variant, enc, llm, s):
    """blsp.py's step: speech_vectors, behaviour_sample, behaviour_loss."""
    adapter = blsp.Adapter(enc.dim, llm.config.hidden_size)
    embed, flops = llm.get_input_embeddings(), blsp.step_flops(enc, adapter, llm)
    encoder = copy.copy(enc)                            # (its own flag; the same weights)
    encoder.pad_30s = variant == "blsp-30s"             # --whisper-30s: the released BLSP code's way

    def step(batch):
        vecs = blsp.speech_vectors(encoder, adapter, batch)
        samples = [blsp.behaviour_sample(PROMPT, v, AFTER, r, EOS) for v, r in zip(vecs, batch["response"])]
        loss, rows, sp = blsp.behaviour_loss(llm, embed, samples)
        return loss, sp.n_tokens, flops(encoder_frames(batch), sp.llm_tokens, rows)
    return adapter, step


def kd_with_logits(llm, teacher, student, args, full):
    """The KL terms of blsp_kd.kd_losses, the official way: logits of the loss positions all at
    once (full=False); or (full=True) fp32 logits of the whole sequence of both passes, kept until
    the step ends as a model's output would be, then selected.
    -> (loss, tensors to keep, positions each pass ran)."""
    embed = llm.get_input_embeddings()
    sp_t, sp_s = common.splice(embed, teacher), common.splice(embed, student)
    at = blsp_kd.kd_positions(sp_t, sp_s)
    with torch.no_grad():
        h_t = common.hidden_states(llm, sp_t)
        full_t = llm.lm_head(h_t).float() if full else None
    h_s = common.hidden_states(llm, sp_s)
    full_s = llm.lm_head(h_s).float() if full else None
    h_t, h_s = h_t.flatten(0, 1), h_s.flatten(0, 1)                  # kd_positions: flat rows
    lt = {k: full_t.flatten(0, 1)[w[0]] if full else common.logits_at(llm, h_t, w[0]) for k, w in at.items()}
    ls = {k: full_s.flatten(0, 1)[w[1]] if full else common.logits_at(llm, h_s, w[1]) for k, w in at.items()}
    return (sum(blsp_kd.kl(lt[k], ls[k], args.temperature).mean() for k in at), [full_t, full_s],
            (sp_t.llm_tokens, sp_s.llm_tokens))


def kd_method(variant, enc, llm, s, keep):
    """BLSP-KD stage 1 (stage 2 for kd2): all three losses; `keep` holds kd-full's outputs until
    the step ends."""
    kd_args = blsp_kd.KDArgs(**s["cformer"], stage=2 if variant == "kd2" else 1,
                             grad_ckpt=variant.endswith("-ckpt"))
    module, adapter, ctx = blsp_kd.build(kd_args, None, enc, llm)     # blsp_kd.py's trained parts
    vocab, flops = llm.config.vocab_size, blsp_kd.step_flops(enc, adapter, module, llm)

    def step(batch):
        n = [max(1, int(3 * d)) for d in batch["durs"]]  # a transcript of ~3 tokens/s; N vectors by CIF
        vecs, n_dev, total = blsp_kd.speech_vectors(enc, adapter, batch, n)
        transcripts = [torch.randint(100, vocab, (m,)).tolist() for m in n]
        pairs = [blsp_kd.kd_pair(PROMPT, AFTER, t, v, r)
                 for t, v, r in zip(transcripts, vecs, batch["response"])]
        if variant in ("kd", "kd-ckpt", "kd2"):           # this project: blsp_kd.kd_losses as it is
            losses, _, ran = blsp_kd.kd_losses(llm, ctx, *zip(*pairs), kd_args, total, n_dev)
            loss = sum(losses.values())
        else:
            loss, kept, ran = kd_with_logits(llm, *zip(*pairs), kd_args, full=variant == "kd-full")
            keep.extend(kept)
        tokens = sum(len(seg) for pair in pairs for s in pair for seg in s)
        rows = len(pairs) * CONTINUATION + sum(n)         # response + input KL
        return loss, tokens, flops(encoder_frames(batch), sum(n), *ran, rows)
    return module, step


def ssr_method(variant, enc, llm, s):
    """SSR stage 1 (ssr1: CTC forced alignment, connector, distillation; the LLM is not run) or
    stage 2 (ssr2: next-token prediction from the SSR vectors, LoRA on the LLM)."""
    tok, device = common.default_tokenizer(), llm.get_input_embeddings().weight.device
    aligner = common.freeze(ssr.Aligner(enc.dim, 1, s["enc"]["heads"])).to(device)
    connector = ssr.Connector(enc.dim, llm.config.hidden_size, s["connector"]["layers"], s["llm"]["heads"],
                              0.1, checkpoint=variant.endswith("-ckpt")).to(device)
    m = ssr.Models(enc, aligner, connector, llm, tok)
    if variant == "ssr2":
        common.freeze(connector)
        trained = common.add_lora(llm, masked=False)[1]
    flops = ssr.step_flops(m, "2" if variant == "ssr2" else "1")

    def step(batch):                                      # ssr.py's stage 1 and stage 2 steps
        if variant != "ssr2":
            loss, n = ssr.stage1_loss(m, batch, "forced", 5.0)
            return loss, n, flops(encoder_frames(batch), n)
        loss, rows, sp = ssr.stage2_loss(m, batch, "forced", common.bos_ids(tok), tok.eos_token_id)
        return loss, sp.n_tokens, flops(encoder_frames(batch), sp.speech_rows.numel(), sp.n_tokens, rows)
    return (trained if variant == "ssr2" else connector), step


def slm_method(variant, enc, t5, s):
    """SLM: adapter -> [speech ; instruction] into the frozen T5 encoder, decoder CE on the
    transcript (~3 tokens/s)."""
    a = s["slm"]
    adapter = slm.Adapter(enc.dim, t5.config.d_model, slm.embed_norm(t5), 4, a["width"], a["layers"],
                          a["heads"], a["ffn"])
    vocab, eos, instruction = t5.config.vocab_size, 1, list(range(5, 13))
    flops = slm.step_flops(enc, adapter, t5, 4)

    def step(batch):
        vecs = slm.speech_vectors(enc, adapter, batch)
        samples = [slm.encoder_sample(common.speech(v), instruction, eos) for v in vecs]
        targets = [torch.randint(100, vocab, (max(1, int(3 * d)),)).tolist() for d in batch["durs"]]
        loss, n, T_in = slm.slm_loss(t5, samples, targets, eos)
        return loss, T_in + n, flops(encoder_frames(batch), T_in, n)
    return adapter, step


# ----------------------------------------------------------------------------------------------
# Host syncs: what makes the CPU wait for the GPU in the middle of a step

class HostSyncs(TorchDispatchMode):
    """Inside `with HostSyncs(host=[...]) as s:`, counts what would make the host wait for a GPU:
    reading a device tensor's values (.item(), int(), bool(), .tolist(), .numpy(), .cpu(), a
    boolean mask as an index, nonzero, masked_select, unique) and a blocking copy that this
    project's code asks for (.to(device) without non_blocking=True, torch.tensor(..., device=...):
    CUDA first waits for every queued kernel). While the host waits, the GPU runs dry until the host
    has queued the next kernels. It counts the same on a CPU, where nothing of this costs anything,
    so a test can hold a step to the rule: no sync, but where the method itself needs values on
    the host.
    Which tensors are on the host, it follows as the code does: `host` (the batch's wave_lens),
    tensors made from Python values or by factories, and whatever is computed from host tensors
    alone, or moved with .cpu(); .to(device) moves to the device. (A factory's device= is not seen:
    a tensor made on the device counts as the host's until a device tensor is added into it.)
    s.found: {(what, where): count}, where: the innermost frames of this project's files."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
             torch.ops.aten.unique_consecutive.default, torch.ops.aten.unique_dim.default}
    INDEX = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default}
    here = os.path.dirname(os.path.abspath(__file__))

    def __init__(self, host=()):
        super().__init__()
        self.found, self.hosted = collections.Counter(), {}      # id -> weak reference
        for t in host:
            self.mark(t)

    def mark(self, t):
        self.hosted[id(t)] = weakref.ref(t)

    def unmark(self, t):
        self.hosted.pop(id(t), None)

    def on_host(self, t):
        r = self.hosted.get(id(t))
        return r is not None and r() is t

    def record(self, what):
        frames = [f for f in traceback.extract_stack()[:-2]
                  if f.filename.startswith(self.here) and "site-packages" not in f.filename]
        self.found[what, " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                                    for f in reversed(frames[-4:]))] += 1

    def on_device(self, t):
        return isinstance(t, torch.Tensor) and not self.on_host(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in self.READS and self.on_device(args[0]):
            self.record(func.__name__.split(".")[0].lstrip("_"))
        elif func in self.INDEX and self.on_device(args[0]) and any(
                i is not None and i.dtype == torch.bool and self.on_device(i) for i in args[1]):
            self.record("boolean mask index")
        elif func == torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None \
                and self.on_device(args[0]):
            self.record("repeat_interleave")
        out = func(*args, **kwargs)
        host = all(self.on_host(t) for t in inputs)      # computed from host tensors (or none)
        for t in torch.utils._pytree.tree_leaves(out):    # (an in-place op on a host tensor with a
            if isinstance(t, torch.Tensor):               # device operand: the tensor was on the device)
                self.mark(t) if host else self.unmark(t)
        return out

    def __enter__(self):
        T, counter, originals = torch.Tensor, self, {}

        def ours():                              # called from this project's code (not a library's)
            caller = sys._getframe(2).f_code.co_filename
            return caller.startswith(counter.here) and "site-packages" not in caller

        def reads(name):
            def f(t, *a, **k):
                if counter.on_device(t):
                    counter.record(name)
                out = originals[name](t, *a, **k)
                if name == "cpu":                # (on a CPU: itself; the copy is on the host)
                    out = out.view_as(out) if out is t else out
                    counter.mark(out)
                return out
            return f

        def to(t, *a, **k):                     # to the device (not non_blocking: a blocking copy)
            dev = k.get("device") or next((x for x in a if isinstance(x, (torch.device, str))), None)
            out = originals["to"](t, *a, **k)
            if dev is not None and ours():
                if not (k.get("non_blocking") or any(x is True for x in a)):
                    counter.record("blocking copy (.to)")
                out = out.view_as(out) if out is t else out      # (on a CPU: itself)
                to_host = torch.device(dev).type == "cpu" and t.device.type != "cpu"
                counter.mark(out) if to_host else counter.unmark(out)
            return out

        def tensor(*a, **k):
            out = originals["tensor"](*a, **k)
            if k.get("device") is None:
                counter.mark(out)
            elif ours():
                counter.record("blocking copy (torch.tensor(..., device=))")
            return out
        for name in ("tolist", "numpy", "cpu", "to"):
            originals[name] = getattr(T, name)
            setattr(T, name, to if name == "to" else reads(name))
        originals["tensor"] = torch.tensor
        torch.tensor = tensor
        self.originals = originals
        return super().__enter__()

    def __exit__(self, *exc):
        for name in ("tolist", "numpy", "cpu", "to"):
            setattr(torch.Tensor, name, self.originals[name])
        torch.tensor = self.originals["tensor"]
        return super().__exit__(*exc)

    def total(self, skip=()):
        """Syncs, but those whose frames name one of `skip` (functions that work on the host)."""
        return sum(c for (what, where), c in self.found.items() if not any(s in where for s in skip))

    def report(self):
        return "\n".join(f"{c:5d}  {what}: {where}" for (what, where), c in self.found.most_common())


def run_variant(variant, args):
    device = torch.device(args.device)
    common.set_precision(args.precision, device)          # what common.setup does
    if device.type == "cuda":
        common.cuda_settings(device)
    rng = random.Random(0)
    s = dict(SCALES[args.scale], **({"batch": args.batch} if args.batch else {}),
             **({"enc": ENCODERS[args.encoder]} if args.encoder else {}))
    torch.manual_seed(0)
    enc = build_encoder(s["enc"], device)
    keep = []                                              # kd-full: the outputs live until step end
    if variant.startswith("slm"):
        llm = build_t5(args.scale, device)
        module, step = slm_method(variant, enc, llm, s)
    else:
        vocab = args.vocab if variant.startswith("kd") else 32000
        llm = build_llm(args.scale, vocab, device)
        if variant.endswith("-ckpt"):                     # what --grad-ckpt does
            common.enable_checkpointing(llm)
        if variant.startswith("kd"):
            module, step = kd_method(variant, enc, llm, s, keep)
        elif variant.startswith("ssr"):
            module, step = ssr_method(variant, enc, llm, s)
        else:
            module, step = blsp_method(variant, enc, llm, s)
    module.to(device).train()
    if variant.endswith("-compile"):
        common.compile_adapter(module, common.Args(compile=True))
    if variant.endswith("-compile-llm"):
        compile_llm_layers(llm)
    if variant.endswith(("-noprefix", "-compile-llm")):    # every sample runs the whole prompt
        common.SHARED_PREFIX_MIN = 1 << 30
    if variant.endswith("-fused-norm"):
        fuse_rms_norms(llm)
    trained = [p for p in module.parameters() if p.requires_grad]
    opt = common.make_optimizer(trained, common.Args(lr=1e-4), device)
    for p in trained:                                     # AdamW's state now, so that the baseline
        p.grad = torch.zeros_like(p)                      # below holds it (it is made at the first
    opt.step()                                            # step: it fell in "step")
    opt.zero_grad(set_to_none=True)
    warm, timed, pad = batches(variant, args.steps, s["batch"], rng)
    text_rng = random.Random(1)                           # the same texts in every variant
    t0, audio, tokens, flops = None, 0.0, 0, 0.0
    base = memory(device)                                 # models and optimizer state, no step yet

    def train_step(durs, syncs=None):
        batch = make_batch(durs, llm.config.vocab_size, text_rng, device, variant.endswith("-1s"))
        counting = syncs(host=[batch["wave_lens"]]) if syncs else contextlib.nullcontext()
        with common.autocast(device), counting as s:
            loss, T, fl = step(batch)
        if syncs:
            res["host_syncs"] = s.total()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        keep.clear()
        return T, fl

    for k, durs in enumerate(warm + timed):
        if k == len(warm):                                # the warm-up steps are not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
        T, fl = train_step(durs)
        if k >= len(warm):
            audio, tokens, flops = audio + sum(durs), tokens + T, flops + fl
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    res = dict(variant=variant, samples_per_s=args.steps * s["batch"] / dt, audio_s_per_s=audio / dt,
               llm_tokens_per_s=tokens / dt, padding=pad, step_s=dt / args.steps)
    res["peak_gib"] = memory(device, peak=True)
    res["step_gib"] = res["peak_gib"] - base
    if device.type == "cuda" and common.peak_flops(device):
        res["mfu"] = flops / dt / common.peak_flops(device)
    if args.again:                                        # the same batches once more: lengths seen
        t1 = time.time()
        for durs in timed:
            train_step(durs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res["step_s_again"] = (time.time() - t1) / args.steps
        if "mfu" in res:                                  # (steady state: no new shapes to plan)
            res["mfu_again"] = flops / (res["step_s_again"] * args.steps) / common.peak_flops(device)
    if args.profile:                                      # one more step of the last timed lengths
        res["profile"] = profile(lambda: train_step(timed[-1]), device)
    train_step(timed[-1], HostSyncs)                      # the forward's waits for the GPU, counted
    if device.type == "cuda":                             # and as CUDA sees them (library code too)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            train_step(timed[-1])
            torch.cuda.set_sync_debug_mode("default")
        res["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in seen)
    return res


def compile_llm_layers(llm):
    """blsp-compile-llm: each layer of the frozen LLM compiled, one compile for all of them (with
    the shared prefix off: its keys and values are read by layer number, which would compile every
    layer apart)."""
    for layer in llm.model.layers:
        common.compile_adapter(layer, common.Args(compile=True))


def fuse_rms_norms(llm):
    """Each Llama-style RMSNorm of the LLM as one F.rms_norm call: the same function up to
    rounding (the weight multiplies before the one rounding to bf16, where HF rounds, then
    multiplies). -> how many were replaced."""
    norms = [m for m in llm.modules() if type(m).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")]
    for m in norms:
        m.forward = lambda x, m=m: F.rms_norm(x, m.weight.shape, m.weight, m.variance_epsilon)
    return len(norms)


KINDS = (("attention", ("attention", "flash", "fmha", "efficient")),        # first: "fmha_cutlass..."
         ("convolution", ("conv", "implicit")),                             # before: "..implicit_gemm.."
         ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "gemm", "nvjet", "cutlass",
                     "xmma", "cublas")))


def profile(run, device):
    """Where one step's time goes: the profiler's self time (GPU kernels on CUDA, ATen operators
    on CPU) by kind (matrix products, attention, convolutions, the rest: element-wise, copies,
    reductions), and the 10 largest entries."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count)
              for e in prof.key_averages()]
    events = sorted((e for e in events if e[1] > 0), key=lambda e: -e[1])
    total = sum(ms for _, ms, _ in events)
    kinds = {}
    for name, ms, _ in events:
        kind = next((k for k, keys in KINDS if any(x in name.lower() for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms / total
    return dict(total_ms=total, kinds=kinds, top=[dict(name=n[:80], ms=ms, calls=c) for n, ms, c in events[:10]])


def memory(device, peak=False):
    """GiB: CUDA: allocated (peak: max allocated); CPU: the process's resident set (peak: its peak;
    each variant runs in its own process, unless --in-process)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2 ** 30
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="tiny", choices=list(SCALES), help="model sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary of the KD variants (Qwen: 151936)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--batch", type=int, default=None, help="clips per batch (default: the scale's)")
    p.add_argument("--encoder", default=None, choices=list(ENCODERS),
                   help="encoder shape instead of the scale's (large-v2: BLSP-KD's paper encoder)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="frozen models and autocast, as the scripts' --precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--again", action="store_true",
                   help="time the same batches a second time: the cost of new lengths (kernel plans, "
                        "compiles, allocator growth) shows as the difference")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step per variant: time by kind (matmul, attention, convolution, "
                        "other) and the top entries")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds allowed to one variant (in its own process: not with --in-process)")
    p.add_argument("--live-memory", action="store_true",
                   help="CPU: MALLOC_MMAP_THRESHOLD_=1 MiB in each variant, so that peak RSS follows live memory")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants one after the other in this process (a quick check that they "
                        "all run: the test's; on CPU the peak and step memory are then the process's so "
                        "far, not each variant's)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one variant
    args = p.parse_args()
    if args.in_process and args.live_memory:
        sys.exit("error: --live-memory sets each variant's process's allocator: not with --in-process")
    if args.scale == "paper" and args.device == "cpu":
        sys.exit("error: --scale paper needs a GPU (--device cuda)")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: --variants: unknown {','.join(unknown)} (choose among {','.join(VARIANTS)})")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    rows, failed = {}, {}
    for v in args.variants.split(","):                    # one process per variant: clean peak memory
        if args.in_process:
            prefix_min = common.SHARED_PREFIX_MIN         # (-noprefix changes it)
            try:
                rows[v] = run_variant(v, args)
            except Exception as e:                        # report it, go on with the other variants
                failed[v] = [f"{type(e).__name__}: {e}"]
                traceback.print_exc()
                continue
            finally:
                common.SHARED_PREFIX_MIN = prefix_min
        else:
            out = run_apart(v, args)
            if out.returncode != 0:
                failed[v] = out.stderr.strip().splitlines()[-1:] or ["(no message)"]
                print(f"{v}: failed: {out.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[v]), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(scale=args.scale, device=args.device, precision=args.precision, batch=args.batch,
                               encoder=args.encoder, rows=rows), f, indent=1)
    report(rows, failed, args)


def run_apart(v, args):
    """One variant in a process of its own (its peak memory is its own) -> the CompletedProcess."""
    cmd = [sys.executable, __file__, "--one", v, "--scale", args.scale, "--device", args.device,
           "--steps", str(args.steps), "--vocab", str(args.vocab), "--precision", args.precision] + \
          (["--batch", str(args.batch)] if args.batch else []) + \
          (["--encoder", args.encoder] if args.encoder else []) + (["--profile"] if args.profile else []) + \
          (["--again"] if args.again else [])
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)} if args.live_memory else {}))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 1, "", f"timed out after {args.timeout:.0f} s")


def report(rows, failed, args):
    """The table, the ratios of the official choices, --again and --profile, the failures."""
    cuda = args.device == "cuda"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    print(f"scale={args.scale}" + (f" encoder={args.encoder}" if args.encoder else "") + f" device={args.device} "
          f"({torch.cuda.get_device_name() if cuda else f'{os.cpu_count()} CPU cores'}), frozen models in "
          f"{'bf16' if bf16 else 'fp32'}; memory in GiB: "
          + ("max allocated" if cuda else "peak RSS" + (" (--live-memory)" if args.live_memory else ""))
          + ", and its rise during the steps above the built models")
    print(f"{'variant':15s} {'samples/s':>10s} {'audio s/s':>10s} {'tokens/s':>10s} {'padding':>8s} "
          f"{'peak':>7s} {'step':>7s} {'syncs':>5s}" + (f" {'MFU':>6s} {'CUDA syncs':>10s}" if cuda else ""))
    for v, r in rows.items():
        print(f"{v:15s} {r['samples_per_s']:10.2f} {r['audio_s_per_s']:10.1f} {r['llm_tokens_per_s']:10.0f} "
              f"{r['padding']:8.1%} {r['peak_gib']:7.2f} {r['step_gib']:7.2f} {r['host_syncs']:5d}"
              + (f" {r['mfu']:6.1%} {r['cuda_syncs']:10d}" if 'mfu' in r else ""))

    def ratio(a, b, key="samples_per_s"):
        return rows[a][key] / rows[b][key]
    if "blsp" in rows and "blsp-30s" in rows:
        print(f"BLSP step: {ratio('blsp', 'blsp-30s'):.1f}x faster than the 30 s recipe on this spread, measured")
    if "blsp" in rows and "blsp-nobucket" in rows:
        print(f"length buckets: {ratio('blsp', 'blsp-nobucket'):.2f}x the throughput of random batches "
              f"(padding {rows['blsp']['padding']:.1%} vs {rows['blsp-nobucket']['padding']:.1%})")
    if "blsp" in rows and "blsp-noprefix" in rows:
        print(f"shared prefix run once: {ratio('blsp', 'blsp-noprefix'):.2f}x the throughput of the whole "
              f"prompt for every clip, {ratio('blsp', 'blsp-noprefix', 'peak_gib'):.2f}x the peak memory")
    if "blsp" in rows and "blsp-ckpt" in rows:
        print(f"activation checkpointing of the LLM: {ratio('blsp-ckpt', 'blsp', 'peak_gib'):.2f}x the peak "
              f"memory ({ratio('blsp-ckpt', 'blsp', 'step_gib'):.2f}x during the step), "
              f"{ratio('blsp-ckpt', 'blsp'):.2f}x the throughput")
    for v in ("kd", "kd-ckpt", "kd-select"):
        if v in rows and "kd-full" in rows:
            print(f"BLSP-KD, {v}: {ratio(v, 'kd-full', 'peak_gib'):.2f}x the peak memory of full-sequence "
                  f"fp32 logits ({ratio(v, 'kd-full', 'step_gib'):.2f}x during the step), "
                  f"{ratio(v, 'kd-full'):.2f}x the throughput")
    if "blsp" in rows and "blsp-compile" in rows:
        print(f"compiled adapter: {ratio('blsp-compile', 'blsp'):.2f}x the throughput of blsp")
    if "blsp-noprefix" in rows and "blsp-compile-llm" in rows:
        print(f"compiled LLM layers: {ratio('blsp-compile-llm', 'blsp-noprefix'):.2f}x the throughput of "
              f"blsp-noprefix")
    if "blsp" in rows and "blsp-fused-norm" in rows:
        print(f"fused RMSNorm: {ratio('blsp-fused-norm', 'blsp'):.2f}x the throughput of blsp")
    if "blsp" in rows and "blsp-1s" in rows:
        print(f"audio padded to whole seconds: {ratio('blsp-1s', 'blsp'):.2f}x the throughput of blsp")
    for v, r in rows.items():
        if "step_s_again" in r:
            print(f"again {v}: {r['step_s']:.3f} s a step over new lengths, {r['step_s_again']:.3f} s over "
                  f"the same batches again ({r['step_s'] / r['step_s_again']:.2f}x)"
                  + (f"; MFU {r['mfu']:.1%} -> {r['mfu_again']:.1%}" if "mfu_again" in r else ""))
    for v, r in rows.items():
        if "profile" in r:
            pr = r["profile"]
            print(f"profile {v}: {pr['total_ms']:.0f} ms of {'GPU kernels' if cuda else 'CPU operators'}: "
                  + ", ".join(f"{k} {x:.0%}" for k, x in sorted(pr["kinds"].items(), key=lambda kv: -kv[1])))
            for e in pr["top"]:
                print(f"    {e['ms']:9.1f} ms {e['calls']:6d}x  {e['name']}")
    for v, msg in failed.items():
        print(f"{v}: FAILED: {msg[0]}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
