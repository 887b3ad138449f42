"""SSR: Alignment-Aware Modality Connector for Speech Language Models
(Tan, Inaguma, Dong, Tomasello, Ma, arXiv 2410.00168, 2024; no official code, an early prototype
github.com/steventan0110/fairseq2_speech_llm, branch `steven`).

Idea. Cut the speech into one segment per LLM *text token* with a speech-text aligner, compress each
segment into one vector that should look like that token's input embedding (stage 1: distillation;
encoder and LLM frozen, the LLM is not even run), then fine-tune the LLM on these segmented speech
representations (stage 2). As the vectors sit 1:1 where the text tokens would, the frozen LLM can
read them almost like text: their nearest-token readout is already a zero-shot ASR.

Paper step                                              -> code
  aligner. Paper: its best is the UnitY2 forced aligner (external; character durations in 20 ms units);
    it also compares char-CTC, subword-CTC and CIF aligners. Here: a char-CTC head on the frozen
    encoder frames, one of the aligners the paper compares [choice]
                                                        -> Aligner, aligner_loss (F.ctc_loss)
  character frames, transcript known (training): CTC
    forced alignment [choice]                           -> char_frames (common.ctc_forced_align:
                                                            torchaudio, or a pure-torch Viterbi)
  character frames, no transcript (inference): greedy
    CTC decoding [choice]                               -> common.ctc_greedy
  characters -> LLM tokens: frame of the last character -> token_boundaries
  connector: Linear(d_enc->d_llm, no bias) -> L layers  -> Connector, causal_mask, blockwise_mask
             -> select the boundary frames: 1 per token    (the last layer runs at those frames only)
  stage 1: mean_tok sum_d (z-e)^2 + 5 mean_tok(1-cos)   -> distill_loss, stage1_loss
  nearest-token accuracy: argmax_v cos(z, E_v)          -> readout, distill_eval
  stage 2: next-token prediction from SSR vectors       -> ntp_splice, stage2_loss (LoRA, or
                                                            --finetune full)

Project choices ([choice] in METHODS.md, or where it is silent):
- aligner: pre-norm layers (starting as the identity) + Linear over common.CTC_CHARS on the frozen
  frames; the Linear starts from the encoder folder's ctc_head.safetensors if any (last layer only);
- a CTC character lasts until the next emitted label starts (its trailing blanks are its own:
  common.ctc_runs; the utterance's last character ends with its own run), so word-final
  characters end where the exact boundaries say (toy: within one frame); --aligner oracle: the
  last encoder frame a character overlaps. Spaces are never a token's aligned character; with forced
  or greedy boundaries neither is any character the aligner does not emit (outside a-z and ':
  punctuation, digits, accents, other scripts), with oracle ones every other character of `chars`
  is; a token without an aligned character takes the boundary before it + 1;
- transcripts are used as given: lower-case them without punctuation (as the toy corpus and
  `data.py librispeech` do) or their punctuation becomes tokens the aligner cannot place, and it
  and capitals tokens that greedy CTC never produces at inference (the run warns: unspeakable());
- an utterance whose characters do not fit CTC in its frames is skipped, named once (the record
  drops only one whose tokens do not fit);
- connector layers (common.MaskedBlock): pre-norm LayerNorm, SDPA, 4x GELU MLP, with biases (the
  prototype: Llama-style, RMSNorm and SwiGLU), no positional encoding, no final norm, dropout 0.1
  (the prototype's) on the residual branches and attention weights; blockwise
  mask by default (--no-blockwise: causal): on the toy it learns far faster;
- stage 2: BOS + SSR vectors + EOS, speech position i labelled with transcript token i (--text-mix:
  the transcript's ids instead); BOS only where the tokenizer starts a text with it (Llama; not
  SmolLM2 or Qwen, whose first token is then not predicted). Only the LLM trains: LoRA r 16,
  alpha 16, dropout 0.05 on every Linear of every block (common.add_lora; the record gives none),
  or all of it in fp32 with --finetune full;
- AdamW betas (0.9, 0.95), weight decay 0.1 (matrices only), cosine decay to 0.2 x lr as the
  prototype; toy-scaled steps, lr, warm-up, 2 connector layers, batches of --batch-size clips and
  the encoder's last layer (prototype: lr 1e-4, 2000 warm-up steps, 4 Llama-style layers, at most
  512 text tokens a batch, layer 6 of 12, bf16);
- not measured: MMLU, StoryCloze, Speech-MMLU; forgetting shows in llm_eval's text loss and in
  common.alignment_eval.
"""
import dataclasses
import json
import math
import re
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg, speech, text

BLANK, SPACE = 0, common.CTC_CHARS.index(" ")
CONTINUE_INSTRUCTION = data.CONTINUE_INSTRUCTIONS[0]


@dataclass
class SSRArgs(common.Args):
    stage: str = arg("all", "aligner | 1 | 2 | all (aligner, stage 1, then a short stage 2); a bare --resume "
                            "takes the run's last command's", choices=["aligner", "1", "2", "all"],
                     per_command=True, train_only=True)   # (--resume with it: that stage, the run's settings)
    aligner: str = arg("ctc", "training boundaries: ctc (forced alignment of the transcript) | "
                              "oracle (manifest `chars`: [char, start_s, end_s])", choices=["ctc", "oracle"])
    aligner_layers: int = arg(1, "aligner: transformer layers before the CTC Linear", min=0)
    aligner_steps: int = arg(10, "aligner: optimizer steps (more without a pre-trained CTC head)", min=0,
                             train_only=True)
    aligner_lr: float = arg(1e-3, "aligner: peak learning rate", min=0, train_only=True)
    layers: int = arg(2, "connector: transformer layers (prototype: 4)", min=0)
    heads: int = arg(4, "attention heads (aligner and connector)", min=1)
    dropout: float = arg(0.1, "connector dropout (prototype: 0.1)", min=0, max=1, train_only=True)
    blockwise: bool = arg(True, "connector: blockwise mask (a frame sees from the previous "
                                "boundary up to itself); --no-blockwise: causal")
    cos_weight: float = arg(5.0, "stage 1: lambda, weight of mean(1 - cos(z, e))", min=0, train_only=True)
    steps: int = arg(120, "stage 1: optimizer steps")
    lr: float = arg(3e-3, "stage 1: peak learning rate (prototype: 1e-4)")
    stage2_steps: int = arg(20, "stage 2: optimizer steps (0 with --stage all: no stage 2)", min=0,
                            train_only=True)
    stage2_lr: float = arg(1e-3, "stage 2: peak learning rate", min=0, train_only=True)
    finetune: str = arg("lora", "stage 2: lora (common.add_lora, unmasked) | full", choices=["lora", "full"])
    text_mix: float = arg(0.0, "stage 2: fraction of text-only batches (the transcripts)", min=0, max=1,
                          train_only=True)
    warmup: int = arg(20, "warm-up steps (each stage; at most a fifth of its steps)")
    betas: str = arg("0.9,0.95", "AdamW betas (prototype)")
    weight_decay: float = arg(0.1, "AdamW weight decay (prototype)")
    schedule: str = arg("cosine", "decay after warm-up (prototype: cosine)")
    min_lr_ratio: float = arg(0.2, "final lr / peak lr (prototype: 0.2)")


# ----------------------------------------------------------------------------------------------
# Connector masks (B, T, T) (True: may attend)

def causal_mask(T, device="cpu"):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def blockwise_mask(boundaries, T, device="cpu"):
    """Segment k = frames (b_{k-1}, b_k]; a frame of segment k sees frames b_{k-1} .. itself
    (segment 0 from frame 0; the frames after the last boundary form one more segment). Each
    frame's segment start is found on the host; the (T, T) mask is made on `device`."""
    b = torch.tensor(boundaries, dtype=torch.long)
    seg = torch.searchsorted(b, torch.arange(T))                 # frame t's segment k: b_{k-1} < t <= b_k
    starts = torch.cat([torch.zeros(1, dtype=torch.long), b])    # b_{-1} = 0
    start = common.to_gpu(starts[seg], device)
    t = torch.arange(T, device=device)
    return (t[None] >= start[:, None]) & (t[None] <= t[:, None])


# ----------------------------------------------------------------------------------------------
# The aligner: character CTC (its labels, runs and greedy decoding: common's CTC section)

class Aligner(nn.Module):
    """Frozen encoder frames (B, T, d_enc) -> character log-probs (B, T, |CTC_CHARS|)."""

    def __init__(self, d_enc, layers, heads, head_state=None):
        super().__init__()
        self.blocks = nn.ModuleList(common.MaskedBlock(d_enc, heads) for _ in range(layers))
        for blk in self.blocks:                                  # identity at start: x + 0
            for lin in (blk.out, blk.mlp[-1]):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.head = nn.Linear(d_enc, len(common.CTC_CHARS))
        self.pretrained = head_state is not None
        if head_state is not None:
            self.head.load_state_dict(head_state)

    def forward(self, frames, lens):
        T = frames.shape[1]
        mask = (torch.arange(T, device=frames.device)[None, None] < lens[:, None, None]).expand(-1, T, T)
        x = frames
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(x).float().log_softmax(-1)


def fits(n_frames, ids):
    """CTC needs a frame per label and one more between repeated labels (a blank)."""
    return n_frames >= len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


def aligner_loss(logp, lens, texts):
    """CTC loss summed over the batch -> (loss, target characters of the utterances that fit: the
    others' loss is zeroed). lens: frame counts on the host (CUDA's CTC reads the lengths on the
    host: from the GPU, a sync)."""
    # L = sum over the utterances of -log sum_{pi: B(pi) = c} prod_t p_t(pi_t). c: the utterance's CTC labels
    # (common.ctc_labels: lower-cased, CTC_CHARS only, one space between words); pi: a path of labels and
    # blanks over its frames; B: merge repeats, then drop blanks. An utterance that does not fit has an
    # infinite loss, zeroed (zero_infinity). common.train divides the sum by n_chars (summed over its
    # micro-batches and processes): the mean per label of the utterances that fit.
    tgts = [common.ctc_labels(t)[1] for t in texts]
    flat = common.to_gpu(torch.tensor([c for t in tgts for c in t], dtype=torch.long), logp.device)
    loss = F.ctc_loss(logp.transpose(0, 1), flat, lens, torch.tensor([len(t) for t in tgts]),
                      blank=BLANK, reduction="sum", zero_infinity=True)
    n_chars = sum(len(t) for t, T in zip(tgts, lens.tolist()) if fits(T, t))
    return loss, n_chars


def char_frames(logp, txt):
    """Forced alignment -> {position in " " + txt: last frame} of each aligned non-space
    character, or None when the transcript cannot fit in the frames."""
    pos, ids = common.ctc_labels(txt)
    if not fits(logp.shape[0], ids):
        return None
    ends = [t for _, t in common.ctc_runs(common.ctc_forced_align(logp, ids))] if ids else []
    return {p: t for p, k, t in zip(pos, ids, ends) if k != SPACE}


def aligner_cer(m, items, args, device):
    """Character error rate of greedy CTC against each transcript's CTC targets (lower case,
    only CTC_CHARS: what the aligner can emit)."""
    err = n = 0
    for b in common.batches(items, args):
        _, lens, logp = encode(m, common.to_device(b, device))
        for i, (t, T) in enumerate(zip(b["text"], lens.tolist())):
            ref = "".join(common.CTC_CHARS[k] for k in common.ctc_labels(t)[1])
            err += common.edit_distance(ref, common.ctc_greedy(logp[i, :T])[0])
            n += len(ref)
    return err / max(n, 1)


def oracle_frames(chars, txt, frame_seconds, where="chars"):
    """Exact boundaries: each non-space character's last overlapping frame."""
    pos = [i for i, c in enumerate(" " + txt) if c != " "]
    if len(pos) != len(chars) or any((" " + txt)[p] != c for p, (c, _, _) in zip(pos, chars)):
        raise data.DataError(f"{where}: `chars` do not match the transcript {txt!r} (one entry per "
                             f"character but spaces)")
    return {p: max(0, math.ceil(end / frame_seconds - 1e-6) - 1) for p, (_, _, end) in zip(pos, chars)}


# ----------------------------------------------------------------------------------------------
# Characters -> LLM tokens

def tokens_of(tok, txt):
    """The transcript's LLM tokens as an input (common.input_ids) -> (ids, each token's (start,
    end) in " " + txt: the positions the character frames use)."""
    sp = common.space_before(tok)
    enc = tok(sp + txt, return_offsets_mapping=True, add_special_tokens=False)
    return enc.input_ids, [(s + 1 - len(sp), e + 1 - len(sp)) for s, e in enc.offset_mapping]


def token_boundaries(offsets, frames, n_frames):
    """LLM token k ends at the frame of its last aligned character (offsets: each token's (start,
    end) in " " + text; frames: {character position: frame}); a token with no aligned character
    takes the previous boundary; then made strictly increasing and clipped to the last frame.
    -> list of frames, or None when the tokens cannot fit (never truncated)."""
    b, prev = [], -1
    for s, e in offsets:
        own = [frames[p] for p in range(s, e) if p in frames]
        prev = own[-1] if own else prev
        b.append(prev)
    for k in range(len(b)):                                   # b_k > b_{k-1}
        b[k] = max(b[k], b[k - 1] + 1 if k else 0)
    last = n_frames - 1
    for k in reversed(range(len(b))):                         # b_k <= last frame, still increasing
        b[k] = last = min(b[k], last)
        last -= 1
    return b if not b or b[0] >= 0 else None


# ----------------------------------------------------------------------------------------------
# The connector and the SSR vectors

class Connector(nn.Module):
    """Frames (B, T, d_enc) -> Linear -> L masked layers -> the outputs at the boundary frames.
    checkpoint (--grad-ckpt): each layer keeps its input only and runs again in the backward."""

    def __init__(self, d_enc, d_llm, layers, heads, dropout, blockwise=True, checkpoint=False):
        super().__init__()
        self.proj = nn.Linear(d_enc, d_llm, bias=False)
        self.blocks = nn.ModuleList(common.MaskedBlock(d_llm, heads, dropout) for _ in range(layers))
        self.blockwise, self.checkpoint = blockwise, checkpoint

    def forward(self, frames, boundaries):
        x = self.proj(frames)
        B, T, _ = x.shape
        mask = (torch.stack([blockwise_mask(b, T, x.device) for b in boundaries]) if self.blockwise else
                causal_mask(T, x.device).expand(B, T, T))       # (B x T x T booleans: not copied over)
        K = max(map(len, boundaries), default=0)
        rows = common.to_gpu(torch.tensor([b + [0] * (K - len(b)) for b in boundaries], dtype=torch.long),
                             x.device)
        for blk in self.blocks[:-1]:
            x = common.recomputed(blk, x, mask, on=self.checkpoint)
        # selection: the last layer runs only at the boundary frames (the only outputs used)
        x = common.recomputed(self.blocks[-1], x, mask, rows, on=self.checkpoint) if len(self.blocks) \
            else x[torch.arange(B, device=x.device)[:, None], rows]
        return [x[i, :len(b)] for i, b in enumerate(boundaries)]


@dataclass
class Models:
    """What SSR's steps read (tok: the LLM's fast tokenizer)."""
    encoder: nn.Module
    aligner: Aligner
    connector: Connector
    llm: nn.Module
    tok: object


def encode(m, batch):
    """Frozen encoder frames, frame counts (on the host) and aligner log-probs of a batch, copied
    to the host for the alignment (the step's one wait for the GPU); computed once (kept in it)."""
    if "ssr_frames" not in batch:
        with torch.no_grad():
            frames, lens = m.encoder(batch["wave"], batch["wave_lens"])
            batch["ssr_frames"] = (frames.float(), m.encoder.output_lengths(batch["wave_lens"]),
                                   m.aligner(frames.float(), lens).cpu())
    return batch["ssr_frames"]


def ssr_vectors(m, batch, mode):
    """wave -> frozen encoder -> boundaries (oracle | forced | greedy) -> connector.
    -> (vectors, token ids, boundaries, kept indices): an example whose tokens cannot fit in its
    frames is reported (once) and skipped."""
    frames, lens, logp = encode(m, batch)
    ids, bnds, keep = [], [], []
    for i, T in enumerate(lens.tolist()):
        txt = batch["text"][i] if "text" in batch else None
        where = batch.get("where", [None] * len(lens))[i]             # (manifest line)
        if mode == "greedy":                                    # no transcript: CTC's own
            txt, char_end = common.ctc_greedy(logp[i, :T])
        elif mode == "forced":
            char_end = char_frames(logp[i, :T], txt)
        else:
            char_end = oracle_frames(batch["chars"][i], txt, m.encoder.frame_seconds, where or "chars")
        token_ids, offsets = tokens_of(m.tok, txt)
        b = token_boundaries(offsets, char_end, T) if char_end is not None else None
        if b is None:
            what = f"{len(token_ids)} tokens" if char_end is not None else "its characters (CTC)"
            common.warn_once(where or txt, f"ssr: skipped {where or txt}: {what} do not fit in {T} frames "
                                           f"({mode} boundaries)")
            continue
        ids.append(token_ids)
        bnds.append(b)
        keep.append(i)
    if len(keep) < len(frames):
        frames = frames[common.to_gpu(torch.tensor(keep, dtype=torch.long), frames.device)]
    return (m.connector(frames, bnds) if keep else []), ids, bnds, keep


def every_vector(m, batch):
    """CTC (greedy) SSR vectors of every utterance of a batch (empty where skipped)."""
    vecs, _, _, keep = ssr_vectors(m, batch, "greedy")
    out = [torch.zeros(0, m.llm.config.hidden_size, device=batch["wave"].device) for _ in batch["wave"]]
    for v, i in zip(vecs, keep):
        out[i] = v
    return out


# ----------------------------------------------------------------------------------------------
# Stage 1: distillation into the text embeddings; stage 2: next-token prediction

def distill_loss(z, e, lam):
    """sum over tokens of ( sum_d (z - e)^2 + lam (1 - cos(z, e)) ) -> (loss sum, tokens);
    common.train divides by the tokens: mean_tok."""
    mse = ((z - e) ** 2).sum(-1)                                # sum_dim (z - e)^2
    cos = F.cosine_similarity(z, e, dim=-1)
    return (mse + lam * (1 - cos)).sum(), z.shape[0]


def readout(z, table):
    """Nearest token of each vector: argmax over the vocabulary of cos(z, E_v)."""
    return (F.normalize(z.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T).argmax(-1)


def ntp_splice(embed, inputs, ids_list, bos, eos):
    """BOS + input (SSR vectors, or the transcript's ids) + EOS; input position i is labelled
    with transcript token i, so position i-1 predicts token i and the last input position EOS.
    Loss (stage2_loss, common.lm_loss), for n tokens y_1..y_n and inputs z_1..z_n:
      L = -sum_{i=1..n} log p(y_i | BOS, z_<i) - log p(EOS | BOS, z_1..z_n)   (cross-entropy, fp32).
    Without a BOS (SmolLM2, Qwen) nothing comes before z_1: y_1 is not predicted (the sum starts at
    i = 2). The loss is summed over the batch; common.train divides it by the predicted tokens (n + 1
    per utterance, n without a BOS; summed over micro-batches and processes): a token-normalised mean."""
    return common.splice(embed, [[text(bos), dataclasses.replace(x, labels=ids), text([eos], loss=True)]
                                 for x, ids in zip(inputs, ids_list)])


def stage1_loss(m, batch, mode, lam):
    """Stage 1 micro-batch -> (distill_loss sum, tokens): the SSR vectors against the input
    embeddings of the transcript's tokens (the LLM itself is not run)."""
    vecs, ids, _, _ = ssr_vectors(m, batch, mode)
    if not vecs:                                                # (every example skipped)
        return m.connector.proj.weight.sum() * 0, 0
    table = m.llm.get_input_embeddings().weight
    flat = [i for x in ids for i in x]
    e = table[common.to_gpu(torch.tensor(flat), table.device)]     # e: each token's input-embedding row
    return distill_loss(torch.cat(vecs).float(), e.float(), lam)


def stage2_loss(m, batch, mode, bos, eos, text_only=False):
    """Stage 2 micro-batch -> (next-token loss sum, predicted tokens, the splice): BOS + SSR
    vectors + EOS (text_only: the transcript's ids in their place) through the LLM."""
    if text_only:
        ids = [common.input_ids(m.tok, t) for t in batch["text"]]
        inputs = [text(x) for x in ids]
    else:
        vecs, ids, _, _ = ssr_vectors(m, batch, mode)
        if not vecs:                            # (every example skipped; none trains: an evaluation)
            w = next((p for p in m.llm.parameters() if p.requires_grad), None)
            return (w.sum() * 0 if w is not None else torch.zeros((), device=m.connector.proj.weight.device)), 0, None
        inputs = [speech(v) for v in vecs]
    sp = ntp_splice(m.llm.get_input_embeddings(), inputs, ids, bos, eos)
    return (*common.lm_loss(m.llm, common.hidden_states(m.llm, sp), sp), sp)


@torch.no_grad()
def distill_eval(m, items, args, device):
    """Per boundary source (oracle, if every item has `chars`; forced; greedy), on the utterances
    that got one vector per transcript token (`matched`: their share of all): cosine, MSE (sum_d
    (z - e)^2 per token) and nearest-token accuracy; the readout's zero-shot WER, over all (one
    whose tokens did not fit its frames reads as nothing); bnd_err_forced: mean |forced - oracle|
    token boundary, in frames."""
    modes = (["oracle"] if all("chars" in it for it in items) else []) + ["forced", "greedy"]
    was = m.connector.training
    E = m.llm.get_input_embeddings().weight.float()             # the embedding table
    s = {md: defaultdict(float) for md in modes + ["bnd"]}      # sums per mode
    refs, hyps = defaultdict(list), defaultdict(list)           # readout texts per mode
    m.connector.eval()
    for batch in common.batches(items, args):
        batch, got = common.to_device(batch, device), {}
        for md in modes:
            vecs, _, bnds, keep = ssr_vectors(m, batch, md)
            got[md] = dict(zip(keep, bnds))
            s[md]["utts"] += len(batch["text"])
            for i in sorted(set(range(len(batch["text"]))) - set(keep)):    # no vectors (its tokens did
                refs[md].append(batch["text"][i])                           # not fit): nothing read out
                hyps[md].append("")
            for z, i in zip(vecs, keep):
                ref = common.input_ids(m.tok, batch["text"][i])
                pred, z = readout(z, E), z.float()
                refs[md].append(batch["text"][i])
                hyps[md].append(m.tok.decode(pred.tolist(), skip_special_tokens=True))
                if len(ref) != len(z):                  # greedy may decode another token count
                    continue
                e = E[torch.tensor(ref, device=E.device)]
                s[md]["cos"] += float(F.cosine_similarity(z, e, dim=-1).sum())
                s[md]["mse"] += float(((z - e) ** 2).sum())
                s[md]["acc"] += float((pred.cpu() == torch.tensor(ref)).sum())
                s[md]["tok"] += len(ref)
                s[md]["match"] += 1
        for i, b in got["forced"].items():              # against oracle, where as many tokens
            o = got.get("oracle", {}).get(i, [])
            if len(o) == len(b):
                s["bnd"]["err"] += sum(abs(x - y) for x, y in zip(b, o))
                s["bnd"]["n"] += len(b)
    m.connector.train(was)
    res = {f"{k}_{md}": s[md][k] / s[md]["tok"] if s[md]["tok"] else None     # (None: no utterance
           for md in modes for k in ("cos", "mse", "acc")}                    # matched)
    res.update({f"wer_{md}": common.wer(refs[md], hyps[md]) if refs[md] else None for md in modes})
    res.update({f"matched_{md}": s[md]["match"] / max(s[md]["utts"], 1) for md in modes})
    if s["bnd"]["n"]:
        res["bnd_err_forced"] = s["bnd"]["err"] / s["bnd"]["n"]
    return res


@torch.no_grad()
def llm_eval(m, items, args, device, instruction=None):
    """After stage 2: its loss per transcript token from the SSR vectors (forced boundaries) and
    from the transcript's ids (the LLM's text ability: where forgetting shows); common.alignment_eval
    (content_acc; repeat_wer with `instruction`, or the default repeat instruction)."""
    bos, eos = text_ends(m)
    s = defaultdict(float)
    for batch in common.batches(items, args):
        batch = common.to_device(batch, device)
        for k in ("speech", "text"):
            loss, n, _ = stage2_loss(m, batch, "forced", bos, eos, text_only=k == "text")
            s[k] += float(loss)
            s["n_" + k] += n
    r = {f"{k}_loss": s[k] / max(s["n_" + k], 1) for k in ("speech", "text")}
    r.update(common.alignment_eval(m.llm, m.tok, items, args, device, lambda b: every_vector(m, b),
                                   CONTINUE_INSTRUCTION, *([instruction] if instruction else [])))
    r.pop("repeat_example")
    return r


def text_ends(m):
    """Stage 2's (BOS ids, EOS id): BOS as the tokenizer starts a text, the tokenizer's EOS."""
    eos = m.tok.eos_token_id if m.tok.eos_token_id is not None else common.eos_ids(m.llm, m.tok)[0]
    return common.bos_ids(m.tok), eos


def step_flops(m, stage, full=False):
    """-> flops(frames, vectors=0, tokens=0, rows=0), a stage's step (common.matrices: 2N frozen,
    4N frozen passing gradients back, 6N trained): the part a stage trains 6N, the rest 2N; in
    stage 2 the LLM 4N (LoRA 6N) at the tokens, its output layer at the rows. The connector's
    last output projection and MLP run at the SSR vectors only."""
    n_enc, n_al = common.matrices(m.encoder), common.matrices(m.aligner)
    last = m.connector.blocks[-1] if len(m.connector.blocks) else None
    n_vec = common.matrices(last.out) + common.matrices(last.mlp) if last else 0
    n_conn = common.matrices(m.connector) - n_vec                        # per frame
    if stage == "aligner":
        return lambda frames, vectors=0, tokens=0, rows=0: (2 * n_enc + 6 * n_al) * frames
    if stage == "1":
        return lambda frames, vectors=0, tokens=0, rows=0: (2 * (n_enc + n_al) + 6 * n_conn) * frames \
            + 6 * n_vec * vectors
    n_llm, n_head = common.llm_matrices(m.llm)
    k = 6 if full else 4                                                 # LLM: trained | frozen
    n_lora = 0 if full else common.matrices(m.llm, trained=True)         # LoRA's A and B
    return lambda frames, vectors=0, tokens=0, rows=0: 2 * (n_enc + n_al + n_conn) * frames \
        + 2 * n_vec * vectors + (k * (n_llm - n_lora) + 6 * n_lora) * tokens + k * n_head * rows


# ----------------------------------------------------------------------------------------------
# The stages, each through common.train in its own subdirectory of --out

STAGES = common.Stages("ssr", {"aligner": "aligner", "1": "stage1", "2": "stage2"}, "an SSR run",
                       {"aligner": "--aligner-steps", "1": "--steps", "2": "--stage2-steps"})
_ALIGNER = ("llm", "encoder", "encoder_layer", "whisper_30s", "aligner_layers", "heads")
STAGE_FIELDS = {"aligner": _ALIGNER, "1": _ALIGNER + ("layers", "blockwise"),     # what each stage's
                "2": _ALIGNER + ("layers", "blockwise", "finetune")}              # checkpoint fixes


def build(args, encoder, llm, tok, device):
    for name, d, used in (("encoder", encoder.dim, args.aligner_layers), ("LLM", llm.config.hidden_size, args.layers)):
        if used and d % args.heads:
            raise common.UserError(f"--heads {args.heads} does not divide the {name} width {d}")
    cfg = encoder.model.config
    last = encoder.layer in (-1, getattr(cfg, "encoder_layers", None) or cfg.num_hidden_layers)
    head = common.load_ctc_head(args.encoder) if last else None         # (a head of the last layer)
    aligner = Aligner(encoder.dim, args.aligner_layers, args.heads, head)
    connector = Connector(encoder.dim, llm.config.hidden_size, args.layers, args.heads, args.dropout,
                          args.blockwise, args.grad_ckpt)
    return Models(encoder, aligner.to(device), connector.to(device), llm, tok)


def stage2_module(args, llm):
    return common.unfreeze(llm) if args.finetune == "full" else common.add_lora(llm, masked=False)[1]


def unspeakable(items):
    """How many transcripts hold what greedy CTC never writes: capitals, or characters the aligner
    does not emit (punctuation, digits, other letters)."""
    return sum(bool(_NOT_CTC.search(it["text"])) for it in items)


_NOT_CTC = re.compile(r"[^a-z'\s]")      # (common.CTC_CHARS: a-z, ' and space; capitals too)


def run_stages(args, m, device, rank, world):
    train_items, valid_items = common.manifests(args, m.encoder)
    if rank == 0 and (odd := unspeakable(train_items)):
        print(f"ssr: warning: {odd} of {len(train_items)} training transcripts have characters other than "
              f"a-z, ' and spaces: greedy CTC never writes them at inference (capitals come out in lower "
              f"case), so the LLM reads other tokens than in training; with forced boundaries a token of "
              f"punctuation or digits only has no character of its own (it takes the boundary before it + 1). "
              f"Lower-case them without punctuation first", file=sys.stderr)
    lacking = next((it for it in train_items if "chars" not in it), None) if args.aligner == "oracle" else None
    if lacking:
        raise common.UserError(f"--aligner oracle: {lacking['where']}: no `chars` field (oracle boundaries "
                               f"need every training line's)")
    for it in train_items + valid_items:                # (checked before any stage trains)
        if it.get("chars") is not None:
            oracle_frames(it["chars"], it["text"], m.encoder.frame_seconds, it["where"])
    stages = [args.stage] if args.stage != "all" else ["aligner", "1"] + (["2"] if args.stage2_steps else [])
    STAGES.check(args, stages, STAGE_FIELDS)
    for blk in m.connector.blocks:            # --compile: the layers; masks and rows are built
        common.compile_adapter(blk, args)     # from Python lists, which would recompile every batch
    mode = "oracle" if args.aligner == "oracle" else "forced"           # the training boundaries
    res = {}

    def train(stage, module, step_fn, valid_fn, steps, lr):
        return common.train(STAGES.args(args, stage, steps, lr), module, step_fn, train_items, device, rank,
                            world, valid_fn, method=STAGES.method_of(stage), model_fields=STAGE_FIELDS[stage],
                            resume_dir=args.out, run_args=args)

    if "aligner" in stages:
        flops = step_flops(m, "aligner")

        def aligner_step(batch):
            with torch.no_grad():
                frames, lens = m.encoder(batch["wave"], batch["wave_lens"])
            loss, n = aligner_loss(m.aligner(frames.float(), lens), m.encoder.output_lengths(batch["wave_lens"]),
                                   batch["text"])
            return loss, n, dict(flops=flops(m.encoder.frames))

        res = train("aligner", m.aligner, aligner_step,
                    lambda step: dict(cer=aligner_cer(m, valid_items, args, device)), args.aligner_steps,
                    args.aligner_lr)
    else:       # (not after training it: under torchrun, rank 0 may still be writing its checkpoint)
        STAGES.load(m.aligner, args.out, "aligner")
        if rank == 0 and not m.aligner.pretrained and not STAGES.trained(args.out, "aligner"):
            print("ssr: warning: no trained aligner and no pre-trained CTC head: CTC boundaries are "
                  "random (run --stage aligner first)", file=sys.stderr)
    common.freeze(m.aligner)
    if stages == ["aligner"]:
        return res

    if "1" in stages:
        flops = step_flops(m, "1")

        def stage1_step(batch):
            loss, n = stage1_loss(m, batch, mode, args.cos_weight)
            return loss, n, dict(flops=flops(m.encoder.frames, n)) if n else {}

        res = train("1", m.connector, stage1_step, lambda step: distill_eval(m, valid_items, args, device),
                    args.steps, args.lr)
        if rank == 0:
            report(res)
    else:
        STAGES.load(m.connector, args.out, "1", required=True)
    common.freeze(m.connector)

    if "2" in stages:
        bos, eos = text_ends(m)
        module = stage2_module(args, m.llm).train()
        flops = step_flops(m, "2", args.finetune == "full")

        def stage2_step(batch):
            # a text-only batch (the transcripts); torch's RNG: a checkpoint holds its state
            text_only = args.text_mix > 0 and float(torch.rand(())) < args.text_mix
            loss, n, sp = stage2_loss(m, batch, mode, bos, eos, text_only)
            T = sp.n_tokens if sp else 0
            vectors = sp.speech_rows.numel() if sp else 0    # (0 in a text-only batch)
            return loss, n, dict(tokens=T, flops=flops(0 if text_only else m.encoder.frames, vectors, T, n))

        def stage2_valid(step):
            module.eval()
            r = llm_eval(m, valid_items, args, device, args.instruction)
            module.train()
            return r

        before = stage2_valid(0) if rank == 0 else {}
        res = {**res, **train("2", module, stage2_step, stage2_valid, args.stage2_steps, args.stage2_lr)}
        for k in ("speech_loss", "text_loss", "content_acc", "content_acc_text", "repeat_wer"):
            if rank == 0 and k in res:      # (content_acc: only for manifests with continuations)
                print(f"stage 2 {k:17s} before {before.get(k, math.nan):.4f} -> after {res[k]:.4f}")
    return res


def report(res):
    """The table of distill_eval: per boundary source, on the utterances that got one vector per
    token (matched; '-': none did)."""
    names = dict(oracle="oracle", forced="forced (CTC + transcript)", greedy="CTC (no transcript)")
    print(f"{'boundaries':26s} {'cosine':>7s} {'mse':>8s} {'token_acc':>9s} {'readout_wer':>11s} {'matched':>7s}")
    for m in (md for md in names if f"wer_{md}" in res):
        cells = [("-" if res[f"{k}_{m}"] is None else f"{res[f'{k}_{m}']:.4f}").rjust(w)
                 for k, w in (("cos", 7), ("mse", 8), ("acc", 9))]
        wer = "-" if res[f"wer_{m}"] is None else f"{res[f'wer_{m}']:.4f}"
        print(f"{names[m]:26s} {' '.join(cells)} {wer:>11s} {res[f'matched_{m}']:7.1%}")


# ----------------------------------------------------------------------------------------------
# Inference and evaluation of a trained run (--ckpt: the run directory of all stages)

def infer(args, device):
    STAGES.check_ckpt(args.ckpt, "1")
    last = "2" if STAGES.trained(args.ckpt, "2") else "1"       # its config: the run's arguments
    shape = ("encoder_layer", "whisper_30s", "aligner_layers", "layers", "heads", "blockwise", "finetune")
    free = ("prompt", "max_new_tokens", "instruction")         # (--eval measures as the run validated)
    common.take_run_config(args, STAGES.path(args.ckpt, last), STAGES.method_of(last), ("llm", "encoder") + free
                           + shape, f"--ckpt {args.ckpt}", fixed=shape, free=free)
    llm, tok = common.load_llm(args.llm, device)
    m = build(args, common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s), llm, tok, device)
    STAGES.load(m.aligner, args.ckpt, "aligner")
    STAGES.load(m.connector, args.ckpt, "1")
    if last == "2":
        STAGES.load(stage2_module(args, llm), args.ckpt, "2")
    for part in (m.aligner, m.connector, llm):
        common.freeze(part)
    if args.infer:
        batch = common.infer_batch(args, m.encoder, device)
        with torch.no_grad(), common.autocast(device):
            vecs, ids, _, _ = ssr_vectors(m, batch, "greedy")
            if not vecs:
                raise common.UserError(f"{args.infer}: no token of the CTC transcript fits its frames")
            print(f"aligner (greedy CTC):  {tok.decode(ids[0])}")
            print(f"nearest-token readout: {tok.decode(readout(vecs[0], llm.get_input_embeddings().weight).tolist())}")
            ins = args.instruction if common.given(args, "instruction") else CONTINUE_INSTRUCTION
            print(common.respond(llm, tok, [speech(vecs[0])], ins, args.prompt, args.max_new_tokens)[0])
    if args.eval:
        items = common.eval_items(args, m.encoder)
        res = distill_eval(m, items, args, device)
        report(res)
        if last == "2":                         # the fine-tuned LLM reading the SSR vectors
            res.update(llm_eval(m, items, args, device, args.instruction))
        print(json.dumps(common.json_safe(res), indent=1))


def last_stage(run_dir):
    """The --stage of the last command that trained in run_dir (its config.json), said if not all."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            stage = json.load(f).get("stage", "all")
    except (OSError, ValueError, AttributeError):
        stage = "all"
    if stage != "all" and os.environ.get("RANK", "0") == "0":
        print(f"--resume {run_dir}: --stage {stage}, the run's last command's (--stage all: every stage)",
              file=sys.stderr)
    return stage


@common.guard
def main(argv=None):
    args = common.parse_args(SSRArgs, argv, method="ssr")
    if common.typed(args, "resume") and not common.typed(args, "stage"):   # (a run stopped in its --stage
        args.stage = last_stage(args.resume or args.out)                      # aligner: that)
    if not args.ckpt:
        args.out = args.out or args.resume or "runs/ssr"        # (--resume DIR continues in DIR)
        if not args.resume and args.stage != "all":     # a stage added to a run: the run's settings
            common.resume_config(args, "ssr", adds_to=args.out)     # (--precision, --seed: setup's)
    device, rank, world = common.setup(args)
    if args.ckpt:
        return infer(args, device)
    encoder = common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s)
    llm, tok = common.load_llm(args.llm, device, grad_ckpt=args.grad_ckpt)
    if not tok.is_fast:
        raise common.UserError("SSR needs a fast tokenizer (its offset mapping)")
    res = run_stages(args, build(args, encoder, llm, tok, device), device, rank, world)
    if rank == 0 and res:
        print("final: " + json.dumps(common.json_safe({k: round(v, 4) if isinstance(v, float) else v
                                                        for k, v in res.items()})))


if __name__ == "__main__":
    main()
