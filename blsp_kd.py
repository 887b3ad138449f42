"""BLSP-KD: Bootstrapping Language-Speech Pre-training via Knowledge Distillation
(Wang et al., arXiv 2405.19041, 2024; CIF adapter, KD losses and Partial LoRA as released in
github.com/cwang621/blsp-emo, the "blsp2" model).

Idea. Alignment between speech and text is measured and optimised directly: the frozen LLM given
the transcript (teacher) and given the speech (student) should predict the same next-token
distributions, token by token. That needs one speech vector per transcript token, which continuous
integrate-and-fire (CIF) makes. Stage 1 trains the CFormer adapter only; stage 2 adds Partial LoRA,
a LoRA update applied at speech positions only, so text positions (and the teacher) stay exactly
the frozen LLM.

Paper step / equation                                  -> code
  continuations: same chat LLM, greedy, <= 48 tokens   -> continuation_data()
  CFormer: 4 transformer layers over encoder frames    -> CFormer.pre, CFormer.weights
  alpha_t = sigmoid(h_t[D-1]), 0 on padding            -> CFormer.weights
  N = #transcript tokens (train), max(1, round(sum a)) -> CFormer.forward
  alpha' = alpha * N / sum(alpha)                      -> rescale()
  W[k,t] = max(0, min(c_t, k+1) - max(c_{t-1}, k))     -> cif_weights() (closed form, batched)
  token k = sum_t W[k,t] h_t[:D-1]                     -> CFormer.forward
  Linear(D-1 -> D), 4 layers, Linear(D -> d_llm)       -> CFormer.proj, .post, .out
  teacher: transcript; student: CIF vectors            -> kd_pair()
  length loss |sum alpha - N| / N                      -> kd_losses()["length"]
  response KL(p_t || p_s), T = 2, continuation         -> kd_losses()["response_kl"], kl()
  input KL: speech vector i vs transcript token i      -> kd_losses()["input_kl"] (on by default;
                                                            --no-input-kl)
  L = L_len + L_respKL + L_inKL (+ L_CE), weights 1    -> kd_step() (sum of the kd_losses() terms;
                                                            L_CE: --response-ce)
  the positions each KL is a mean over                 -> kd_positions() (a row t predicts t + 1)
  Partial LoRA: y = W x + m (B A drop(x)) alpha / r     -> common.add_lora(masked=True); m = the
                                                            speech rows: llm_pass(), common.generate
  stage 1 CFormer only; stage 2 + PLoRA, lower lr      -> build(), main() (--stage, --init, STAGE_LR)

Project choices ([choice] in METHODS.md, or where the released code differs):
- transcripts normalised as BLSP's continuation data (lower case, no punctuation; apostrophes and
  digits kept) for the continuation prompt, the teacher and N alike;
- the prompt pieces come from the LLM's chat template, with no system turn of our own
  (common.prompt_pieces; BLSP's template when it has none): the teacher's system turn is the
  template's default (Qwen2's is the released code's "You are a helpful assistant."; SmolLM2's
  names SmolLM; some have none), so the distillation targets depend on it;
- a continuation that generation ended before the limit ends with one token, the one closing the
  assistant's turn (common.answer_end; the released code appends three: <|im_end|>, "\n",
  <|endoftext|>, so its response KL has two more rows there);
- the released code's Qwen-7B-Chat ships its own modelling code (trust_remote_code), which this
  project does not run: Qwen2 / Qwen2.5 chat models have the same ChatML format; Qwen2's template
  adds the released teacher's system turn ("You are a helpful assistant."), Qwen2.5's has its own default
  ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), so a Qwen2.5 teacher's
  distributions are not the released code's;
- the response KL's rows predict the response tokens: the last prompt position up to the one that
  predicts the end token (the released code: the response tokens' own positions, one on);
- each term is a mean over its positions in the micro-batch; a micro-batch returns (sum of the
  means) x k, k its response tokens, and common.train divides by the sum of k: one micro-batch
  optimises exactly the sum of the means, several (--grad-accum, processes) weigh by k;
- no rescaling of the speech vectors (an earlier toy LLM read vectors of RMS 4.1 against 0.13 for
  its embeddings, cosine 0.05 to their word's, yet 96% of each one's CIF weight lay in its word);
- CFormer layers: torch's pre-norm GELU layers (Whisper-style), no positional encoding of their
  own, masked at padding (the released code masks the layers after CIF but not those before it:
  its encoder output is cropped to the batch's longest clip, so for a shorter clip those layers
  also run over the frames past its end, Whisper's output for the silence its input was padded
  with up to 30 s; --whisper-30s reproduces that padding for the encoder);
  --grad-ckpt recomputes them in the backward;
- an unfrozen encoder trains in fp32 at lr / 10 (--encoder-lr); stage 2 takes the CFormer shape
  of its --init run, and its models, prompt format, continuation length and loss settings
  (--temperature, --dropout, the loss terms) unless given;
- toy-scaled defaults (released code: 4 + 4 layers, 8 heads; the authors' follow-up script, stage 1:
  lr 1e-4, batch 768, 1000 warm-up steps, 1 epoch): 2 + 2 layers, 4 heads, batch 16, lr 1.5e-3
  (stage 2: 1e-3), 30 warm-up steps, 1600 steps (~2 min, 1 CPU);
- input KL on by default (the paper's use is unconfirmed): it makes zero-shot instructions work
  from speech (built-in models, 1600 steps, content_acc / repeat_wer: 0.998 / 0.007; --no-input-kl
  0.997 / 0.16), but is only as good as the teacher's distributions at the transcript positions
  (a toy LLM trained with no loss on its input: content_acc 0.10 with the input KL, 0.32 without,
  at 700 steps).
"""
import copy
import json
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg, speech, text

CONTINUE_INSTRUCTION = "Continue the following text in a coherent style:"
STAGE_LR = {1: 1.5e-3, 2: 1e-3}


@dataclass
class KDArgs(common.Args):
    stage: int = arg(1, "1: train the CFormer; 2: CFormer + Partial LoRA from a stage-1 --init",
                     min=1, max=2)
    init: str = arg(None, "a run directory to start from: stage 2, a stage-1 (or stage-2) run; stage 1, a "
                          "warm start. It fixes the CFormer's shape, and gives its models, prompt, "
                          "continuation length and loss settings unless given", start_only=True, train_only=True)
    unfreeze_encoder: bool = arg(False, "stage 2: also train the speech encoder")
    encoder_lr: float = arg(None, "--unfreeze-encoder: the encoder's peak learning rate "
                                  "(default: --lr / 10)", min=0, train_only=True)
    pre_layers: int = arg(2, "CFormer transformer layers before CIF (released code: 4)", min=0)
    post_layers: int = arg(2, "CFormer transformer layers after CIF (released code: 4)", min=0)
    heads: int = arg(4, "attention heads of the CFormer layers (released code: 8)", min=1)
    ffn: int = arg(0, "feed-forward width of the CFormer layers (0: 4 x encoder width)", min=0)
    dropout: float = arg(0.0, "dropout inside the CFormer layers", min=0, max=1, train_only=True)
    length_loss: bool = arg(True, "length loss |sum alpha - N| / N")
    response_kl: bool = arg(True, "KL(teacher || student) on the continuation positions")
    input_kl: bool = arg(True, "KL(teacher || student) at transcript token i vs speech vector i")
    response_ce: bool = arg(False, "cross-entropy on the continuation (BLSP's objective)")
    temperature: float = arg(2.0, "KL temperature (released code: 2)", above=0)
    lora_r: int = arg(16, "stage 2: LoRA rank (released code: 16)", min=1)
    lora_alpha: float = arg(16.0, "stage 2: LoRA alpha (released code: 16)", min=0)
    lora_dropout: float = arg(0.05, "stage 2: LoRA dropout (released code: 0.05)", min=0, max=1, train_only=True)
    continuation_tokens: int = arg(48, "at most this many new tokens per continuation (released code: 48)", min=1)
    gen_batch_size: int = arg(64, "transcripts per continuation-generation batch", min=1)
    steps: int = arg(1600, "optimizer steps")
    lr: float = arg(None, f"peak learning rate (default: stage 1 {STAGE_LR[1]}, stage 2 {STAGE_LR[2]})")
    warmup: int = arg(30, "warm-up steps (the authors' follow-up script, stage 1: 1000)")


MODEL_FIELDS = ("llm", "encoder", "encoder_layer", "whisper_30s", "stage", "pre_layers", "post_layers", "heads",
                "ffn", "lora_r", "lora_alpha", "unfreeze_encoder")


# ----------------------------------------------------------------------------------------------
# CIF: continuous integrate-and-fire, closed form

def rescale(alpha, n):
    """alpha' = alpha * N / sum(alpha): the weights of each sequence sum to N exactly."""
    return alpha * (n.to(alpha.dtype) / alpha.sum(1).clamp(min=1e-6))[:, None]


def cif_weights(alpha, n, K=None):
    """alpha' (B, T) summing to n (B,) -> W (B, K, T), K = max n, zero for k >= n. Token k collects
    the part of frame t's weight inside [k, k+1) of the running sum (fire threshold 1); the last
    token (k = n-1) collects everything from n-1 on (the tail). (K: max n, when the host knows it.)"""
    c = alpha.cumsum(1)                                               # c_t
    c_prev = F.pad(c[:, :-1], (1, 0))                                 # c_{t-1}, c_{-1} = 0
    K = int(n.max()) if K is None else K
    k = torch.arange(K, device=alpha.device, dtype=alpha.dtype)[None, :, None]
    last = k == (n - 1).to(alpha.dtype)[:, None, None]
    upper = torch.where(last, c[:, None, :], torch.minimum(c[:, None, :], k + 1))
    w = (upper - torch.maximum(c_prev[:, None, :], k)).clamp(min=0)   # max(0, min(..) - max(..))
    return w * (k < n.to(alpha.dtype)[:, None, None])


class CFormer(nn.Module):
    """Encoder frames (B, T, D) -> exactly N speech vectors per utterance (B, max N, d_llm).
    checkpoint (--grad-ckpt): each layer keeps its input only and runs again in the backward."""

    def __init__(self, d_enc, d_llm, pre_layers=4, post_layers=4, heads=8, ffn=0, dropout=0.0,
                 checkpoint=False):
        super().__init__()
        if d_enc % heads:
            raise common.UserError(f"--heads {heads} does not divide the encoder width {d_enc}")
        layer = lambda: nn.TransformerEncoderLayer(d_enc, heads, ffn or 4 * d_enc, dropout, activation="gelu",
                                                   batch_first=True, norm_first=True)   # pre-norm
        self.pre = nn.ModuleList(layer() for _ in range(pre_layers))
        self.proj = nn.Linear(d_enc - 1, d_enc)
        self.post = nn.ModuleList(layer() for _ in range(post_layers))
        self.out = nn.Linear(d_enc, d_llm)
        self.checkpoint = checkpoint

    def layers(self, layers, x, pad):
        for layer in layers:
            x = common.recomputed(layer, x, on=self.checkpoint, src_key_padding_mask=pad)
        return x

    def weights(self, frames, lens):
        """-> (h (B, T, D), alpha (B, T)): pre-CIF layers, then alpha_t = sigmoid(h_t[D-1])."""
        pad = torch.arange(frames.shape[1], device=frames.device)[None] >= lens[:, None]
        h = self.layers(self.pre, frames, pad)
        alpha = torch.sigmoid(h[..., -1].float()).masked_fill(pad, 0.0)
        return h, alpha

    def forward(self, frames, lens, n=None):
        """-> (vectors (B, K, d_llm), n (B,), sum of unscaled alpha (B,)). n: target counts, a
        list (training: known on the host); None: max(1, round(sum alpha)) (inference)."""
        h, alpha = self.weights(frames, lens)
        total = alpha.sum(1)
        if n is None:
            n = total.detach().round().clamp(min=1).long().tolist()
        K, n = int(max(n)), common.to_gpu(torch.as_tensor(n), alpha.device)
        w = cif_weights(rescale(alpha, n), n, K)                     # (B, K, T)
        x = torch.bmm(w.to(h.dtype), h[..., :-1])                    # token k = sum_t W[k,t] h_t[:D-1]
        x = self.proj(x)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= n[:, None]
        return self.out(self.layers(self.post, x, pad)), n, total


def speech_vectors(encoder, cformer, batch, n=None, train_encoder=False):
    """wave -> encoder -> CFormer -> (list of (N_i, d_llm) tensors, n, sum alpha)."""
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        frames, lens = encoder(batch["wave"], batch["wave_lens"])
    vecs, n_dev, total = cformer(frames, lens, n)
    n = n if n is not None else n_dev.tolist()                      # (inference: read back)
    return [v[:k] for v, k in zip(vecs, n)], n_dev, total


# ----------------------------------------------------------------------------------------------
# Continuations by the frozen LLM (the teacher's responses)

def continuation_data(llm, tok, items, args, out_dir, tag, reuse_dirs=()):
    """Greedy continuation of each transcript; cached in out_dir (copied from reuse_dirs': stage 2's
    --init run, a run resumed into another --out), resumable. Adds to each item transcript_ids (N =
    their count), response_ids (continuation [+ EOS]) and continuation_ended. A transcript with no
    word once normalised ("?!") would ask CIF for 0 vectors: it stops the run, naming its line
    (--skip-bad: it is left out)."""
    transcripts = [common.normalize(it["text"]) for it in items]      # as BLSP's step 1
    wordless = [it for it, t in zip(items, transcripts) if not t.strip()]
    if wordless and not args.skip_bad:
        raise data.DataError(f"{wordless[0]['where']}: the transcript {wordless[0]['text']!r} has no word once "
                             f"lower-cased without punctuation (no token for CIF to fire; or --skip-bad)")
    if wordless:
        print(f"skipping {len(wordless)} utterances whose transcripts have no word (first: "
              f"{wordless[0]['where']})", file=sys.stderr)
        kept = [(it, t) for it, t in zip(items, transcripts) if t.strip()]
        items[:], transcripts = [it for it, _ in kept], [t for _, t in kept]
    conts, ended = common.cached_answers(llm, tok, CONTINUE_INSTRUCTION, transcripts, args,
                                         args.continuation_tokens, out_dir, tag, True, reuse_dirs)
    eos = common.answer_end(llm, tok, args.prompt)       # the end of the assistant's turn
    ids_of = lambda texts, **kw: common.cached_ids(tok, texts, out_dir, tag, reuse_dirs=reuse_dirs, **kw)
    for it, t, ids, e in zip(items, ids_of(transcripts, as_input=True), ids_of(conts), ended):
        it["transcript_ids"] = t
        natural = e if e is not None else len(ids) < args.continuation_tokens   # (a cache without it)
        if natural:                                     # [+ end]: generation ended
            ids.append(eos)
        it["response_ids"] = ids
        it["continuation_ended"] = natural          # (alignment_eval's targets: the end token where trained)
    return items


# ----------------------------------------------------------------------------------------------
# Teacher and student passes, and the distillation losses

def kd_pair(before, after, transcript_ids, vectors, response_ids):
    """The same segments twice, one swapped: teacher has the transcript, student the speech."""
    teacher = [text(before), text(transcript_ids), text(after), text(response_ids, loss=True)]
    return teacher, teacher[:1] + [speech(vectors)] + teacher[2:]


def llm_pass(llm, sp, ctx, student):
    """Final hidden states. Partial LoRA: the teacher runs with LoRA off (exactly the frozen LLM),
    the student with the LoRA update at its speech positions only (m = 1 there)."""
    if ctx is None:
        return common.hidden_states(llm, sp)
    ctx.enabled, ctx.rows = student, (sp.speech_rows if student else None)
    try:
        return common.hidden_states(llm, sp)
    finally:
        ctx.enabled, ctx.rows = True, None


def kd_positions(sp_t, sp_s):
    """Where the losses look, flat rows b*T+t of each pass: {term: (teacher's, student's)}.
    response: the rows that predict a response token (t predicts labels[t + 1]); input: segment 1
    of kd_pair, the transcript in the teacher and the speech in the student."""
    return dict(response=(sp_t.targets[0], sp_s.targets[0]),
                input=(common.segment_rows(sp_t, 1), common.segment_rows(sp_s, 1)))


def kl(teacher_logits, student_logits, T):
    """KL(p_t || p_s) per row, both distributions at temperature T (no T^2 factor)."""
    lt, ls = (teacher_logits / T).log_softmax(-1), (student_logits / T).log_softmax(-1)
    p = lt.exp()
    return torch.where(p > 0, p * (lt - ls), 0.0).sum(-1)      # sum_v p_t (log p_t - log p_s); 0 log 0 = 0


def kd_losses(llm, ctx, teacher, student, args, total=None, n=None):
    """Teacher (no grad, LoRA off) and student (LoRA at speech) passes -> (dict of loss-term
    means, number of response positions, positions each pass ran: the shared instruction once,
    common.hidden_states). Logits only where a loss looks, one checkpointed chunk of rows at a
    time (common.per_row_loss): a 150k vocabulary never holds (rows, V) fp32 tensors."""
    embed = llm.get_input_embeddings()
    sp_t, sp_s = common.splice(embed, teacher), common.splice(embed, student)
    with torch.no_grad():
        h_t = llm_pass(llm, sp_t, ctx, student=False).flatten(0, 1)      # (B*T, d)
    h_s = llm_pass(llm, sp_s, ctx, student=True).flatten(0, 1)
    at = kd_positions(sp_t, sp_s)
    rows = {term: (h_t[r_t], h_s[r_s]) for term, (r_t, r_s) in at.items()}   # row i: one token
    kl_T = lambda t, s: kl(t, s, args.temperature)
    out = {}
    if args.length_loss and total is not None:
        n = n.to(total)
        out["length"] = ((total - n).abs() / n).mean()                # |sum alpha - N| / N
    if args.response_kl:
        out["response_kl"] = common.per_row_loss(llm, kl_T, rows["response"]).mean()
    if args.input_kl:
        out["input_kl"] = common.per_row_loss(llm, kl_T, rows["input"]).mean()
    if args.response_ce:
        out["response_ce"] = common.per_row_loss(
            llm, lambda s, y: F.cross_entropy(s, y, reduction="none"),
            [rows["response"][1]], [sp_s.targets[1]]).mean()
    return out, len(at["response"][1]), (sp_t.llm_tokens, sp_s.llm_tokens)


def step_flops(encoder, cformer, module, llm, train_encoder=False):
    """-> flops(frames, vectors, T_t, T_s, rows, rows_ce=0), a step's model FLOPs (common.matrices):
    encoder 2N (6N unfrozen); CFormer 6N (pre-CIF layers per frame, the rest per vector); teacher
    2N and student 4N (LoRA 6N) at the T_t, T_s positions each ran; output layer 2N + 4N at the KL
    rows, 4N at --response-ce's. (Slight overcounts: a shared prefix, LoRA at every position.)"""
    n_enc, n_pre = common.matrices(encoder), common.matrices(cformer.pre)
    n_vec = sum(common.matrices(m) for m in (cformer.proj, cformer.post, cformer.out))
    n_lora = common.matrices(module["lora"], trained=True) if "lora" in module else 0
    n_llm, n_head = common.llm_matrices(llm)
    n_llm -= n_lora                                      # LoRA's matrices sit inside the LLM's layers
    return lambda frames, vectors, T_t, T_s, rows, rows_ce=0: \
        ((6 if train_encoder else 2) * n_enc + 6 * n_pre) * frames + 6 * n_vec * vectors \
        + 2 * n_llm * T_t + (4 * n_llm + 6 * n_lora) * T_s + (2 + 4) * n_head * rows + 4 * n_head * rows_ce


def kd_step(encoder, cformer, llm, ctx, before, after, batch, args, flops):
    """One training micro-batch -> (k x the sum of the loss-term means, k, logs) for common.train;
    k = the response positions (common.train divides by the total k). flops: step_flops."""
    N = [len(t) for t in batch["transcript_ids"]]                      # N: transcript tokens
    vecs, n, total = speech_vectors(encoder, cformer, batch, N, args.unfreeze_encoder)
    pairs = [kd_pair(before, after, t, v, r)
             for t, v, r in zip(batch["transcript_ids"], vecs, batch["response_ids"])]
    teachers, students = zip(*pairs)
    losses, k, (t_t, t_s) = kd_losses(llm, ctx, teachers, students, args, total, n)
    loss = sum(losses.values())   # L = L_len + L_respKL + L_inKL (+ L_CE), each weight 1 (the terms switched on)
    tokens = sum(len(seg) for teacher, student in pairs for seg in teacher + student)   # both passes
    rows = k * args.response_kl + sum(N) * args.input_kl              # the KL terms' rows
    logs = {name: v.detach() for name, v in losses.items()}           # (no sync here)
    return loss * k, k, dict(tokens=tokens, flops=flops(encoder.frames, sum(N), t_t, t_s, rows,
                                                        k * args.response_ce), **logs)


@torch.no_grad()
def kd_eval(encoder, cformer, llm, tok, ctx, items, args, device):
    """Response / input KL with the true N, and predicted vs true speech-vector counts."""
    before, after = common.prompt_pieces(tok, CONTINUE_INSTRUCTION, args.prompt)
    measure = copy.copy(args)               # both KLs are measured, whichever ones are trained
    measure.response_kl = measure.input_kl = True
    measure.response_ce = False
    sums = dict(response_kl=0.0, input_kl=0.0, n_resp=0, n_in=0, count_err=0.0, pred=0, true=0, items=0)
    for batch in common.batches(items, args):
        batch = common.to_device(batch, device)
        with common.autocast(device):
            n_true = [len(t) for t in batch["transcript_ids"]]
            _, n_pred, _ = speech_vectors(encoder, cformer, batch)
            vecs, n, total = speech_vectors(encoder, cformer, batch, n_true)
            pairs = [kd_pair(before, after, t, v, r)
                     for t, v, r in zip(batch["transcript_ids"], vecs, batch["response_ids"])]
            losses, k, _ = kd_losses(llm, ctx, *zip(*pairs), measure)
        n_in = sum(n_true)                          # the terms are means over k and n_in positions
        sums["response_kl"] += float(losses["response_kl"]) * k
        sums["input_kl"] += float(losses["input_kl"]) * n_in
        sums["n_resp"], sums["n_in"] = sums["n_resp"] + k, sums["n_in"] + n_in
        sums["count_err"] += float(((n_pred - n).abs() / n).sum())
        sums["pred"] += int(n_pred.sum())
        sums["true"] += int(n.sum())
        sums["items"] += len(n_true)
    return dict(response_kl=sums["response_kl"] / sums["n_resp"],
                input_kl=sums["input_kl"] / sums["n_in"], count_err=sums["count_err"] / sums["items"],
                tokens_pred=sums["pred"] / sums["items"], tokens_true=sums["true"] / sums["items"])


def evaluate(encoder, cformer, llm, tok, ctx, items, args, device):
    """common.alignment_eval (content_acc, repeat_wer; predicted N) + kd_eval."""
    res = common.alignment_eval(llm, tok, items, args, device,
                                lambda b: speech_vectors(encoder, cformer, b)[0],
                                CONTINUE_INSTRUCTION, args.instruction or data.REPEAT_INSTRUCTIONS[0],
                                lora=ctx)
    res.update(kd_eval(encoder, cformer, llm, tok, ctx, items, args, device))
    return res


# ----------------------------------------------------------------------------------------------
# Building the models of a run, inference

def build(args, device, encoder, llm):
    """-> (trainable ModuleDict, cformer, LoRA context or None)."""
    cformer = CFormer(encoder.dim, llm.config.hidden_size, args.pre_layers, args.post_layers,
                      args.heads, args.ffn, args.dropout, args.grad_ckpt).to(device)
    parts, ctx = dict(cformer=cformer), None
    if args.stage == 2:
        ctx, parts["lora"] = common.add_lora(llm, args.lora_r, args.lora_alpha, args.lora_dropout,
                                             masked=True)
        if args.unfreeze_encoder:
            parts["encoder"] = common.unfreeze(encoder)
            if args.grad_ckpt:                            # its layers recomputed, as the LLM's
                common.enable_checkpointing(encoder.model)
    return nn.ModuleDict(parts), cformer, ctx


def load_run(args, device):
    """--ckpt run directory -> (encoder, cformer, llm, tok, ctx); args takes the run's config (what
    --eval measures with too, unless given: the KL temperature, prompt, generation lengths, the
    validation's --instruction)."""
    free = ("prompt", "continuation_tokens", "temperature", "max_new_tokens", "instruction")
    ck = common.take_run_config(args, args.ckpt, "blsp_kd", MODEL_FIELDS + free, fixed=MODEL_FIELDS[2:], free=free)
    encoder = common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s)
    llm, tok = common.load_llm(args.llm, device)
    module, cformer, ctx = build(args, device, encoder, llm)
    common.load_trainable(module, ck).eval()
    return encoder, cformer, llm, tok, ctx


def infer(args, device):
    encoder, cformer, llm, tok, ctx = load_run(args, device)
    if args.infer:
        batch = common.infer_batch(args, encoder, device)
        with torch.no_grad(), common.autocast(device):
            vecs = speech_vectors(encoder, cformer, batch)[0]
            ins = args.instruction if common.given(args, "instruction") else CONTINUE_INSTRUCTION
            print(common.respond(llm, tok, [speech(vecs[0])], ins, args.prompt, args.max_new_tokens, lora=ctx)[0])
    if args.eval:
        items = common.eval_items(args, encoder)
        continuation_data(llm, tok, items, args, args.ckpt, "eval")
        for it in items:
            it.setdefault("continuation", common.answer_text(tok, it["response_ids"]))
        print(json.dumps(common.json_safe(evaluate(encoder, cformer, llm, tok, ctx, items, args, device)), indent=1))


# ----------------------------------------------------------------------------------------------

@common.guard
def main(argv=None):
    args = common.parse_args(KDArgs, argv, method="blsp_kd")
    device, rank, world = common.setup(args)
    if args.ckpt:
        return infer(args, device)
    if args.stage == 2 and not args.init:
        raise common.UserError("--stage 2 needs --init RUN_DIR (a stage-1 run)")
    if args.unfreeze_encoder and args.stage != 2:
        raise common.UserError("--unfreeze-encoder is for stage 2 (stage 1 trains the CFormer only)")
    lora = [k for k in ("lora_r", "lora_alpha", "lora_dropout") if common.typed(args, k)]
    if lora and args.stage == 1:
        raise common.UserError(f"--{lora[0].replace('_', '-')} is for stage 2 (stage 1 has no LoRA)")
    if args.encoder_lr is not None and not args.unfreeze_encoder:
        raise common.UserError("--encoder-lr is the lr of an unfrozen encoder: add --unfreeze-encoder")
    args.lr = STAGE_LR[args.stage] if args.lr is None else args.lr
    args.out = args.out or args.resume or f"runs/blsp_kd{'_stage2' if args.stage == 2 else ''}"
    common.check_out(args, method="blsp_kd", model_fields=MODEL_FIELDS)   # before the continuations
    init = args.init if not args.resume else None   # (a resumed stage 2 holds what --init gave it)
    if init:        # the stage-1 run fixes the models (their folders may be given anew), the
                    # CFormer's shape, and the data it learned from (prompt, continuations) and its
                    # losses unless set
        shape = ("encoder_layer", "whisper_30s", "pre_layers", "post_layers", "heads", "ffn")
        free = ("prompt", "continuation_tokens", "dropout", "temperature", "length_loss", "response_kl",
                "input_kl", "response_ce")
        init_ck = common.take_run_config(args, args.init, "blsp_kd", ("llm", "encoder") + shape + free,
                                         f"--init {args.init}", fixed=shape, free=free)
    if not (args.length_loss or args.response_kl or args.input_kl or args.response_ce):   # (with --init's)
        raise common.UserError("no loss term left: keep one of --length-loss, --response-kl, --input-kl, "
                               "--response-ce")
    encoder = common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s)
    llm, tok = common.load_llm(args.llm, device, grad_ckpt=args.grad_ckpt)
    train_items, valid_items = common.manifests(args, encoder)
    # (built before the continuations: a bad shape stops it first; Partial LoRA with no speech
    # rows is exactly the frozen LLM, so generation is unchanged)
    module, cformer, ctx = build(args, device, encoder, llm)
    common.compile_adapter(cformer, args)
    if init:                            # (a stage-1 run trained the CFormer alone; a stage-2 run
        common.load_trainable(module, init_ck, partial=True)       # its LoRA too: both go on)

    if rank == 0 and not args.resume:     # (a stop while they are generated: --resume takes it)
        common.write_config(args, args.out, "blsp_kd")
    # the LLM's own continuations of the transcripts are the teacher's responses
    continuation_data(llm, tok, train_items, args, args.out, "train", (init, args.resume))
    continuation_data(llm, tok, valid_items, args, args.out, "valid", (init, args.resume))
    for it in valid_items:
        it.setdefault("continuation", common.answer_text(tok, it["response_ids"]))
    before, after = common.prompt_pieces(tok, CONTINUE_INSTRUCTION, args.prompt)

    flops = step_flops(encoder, cformer, module, llm, args.unfreeze_encoder)

    def step_fn(batch):
        return kd_step(encoder, cformer, llm, ctx, before, after, batch, args, flops)

    def valid_fn(step):
        module.eval()
        with torch.no_grad():
            res = evaluate(encoder, cformer, llm, tok, ctx, valid_items, args, device)
        module.train()
        return res

    # a pre-trained encoder moves slower than the new parts ([choice]; at 5e-4 Whisper diverged)
    encoder_lr = args.lr / 10 if args.encoder_lr is None else args.encoder_lr
    scaled = [(module["encoder"].parameters(), encoder_lr / args.lr if args.lr else 0.0)] \
        if "encoder" in module else []
    res = common.train(args, module, step_fn, train_items, device, rank, world, valid_fn,
                       method="blsp_kd", model_fields=MODEL_FIELDS, lr_scale=scaled)
    if rank == 0:
        module.eval()
        common.show_sample(llm, tok, valid_items, args, device, lambda b: speech_vectors(encoder, cformer, b)[0],
                           CONTINUE_INSTRUCTION, lora=ctx)
        print("final: " + json.dumps(common.json_safe({k: v for k, v in res.items() if k != "repeat_example"})))


if __name__ == "__main__":
    main()
