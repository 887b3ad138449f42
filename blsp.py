"""BLSP: Bootstrapping Language-Speech Pre-training via Behavior Alignment of Continuation Writing
(Wang et al., arXiv 2309.00916, 2023; authors' code github.com/cwang621/blsp).

Idea. A frozen LLM should behave the same whether it is given a speech segment or its transcript.
Step 1 asks the LLM to continue every transcript; step 2 trains a small adapter between a frozen
speech encoder and the frozen LLM so that, given the *speech*, the LLM writes that same
continuation. Nothing but the adapter is trained, and only continuations are ever seen: that the
LLM then also follows other instructions about the speech (e.g. "repeat it": zero-shot ASR) is the
paper's emergent ability, measured here as repeat_wer.

Paper step                                            -> code
  step 1: continuation of each transcript, greedy,    -> continuation_data()
          <= 64 new tokens, lower case, no punctuation
          prompt ###[Human]:{instruction} {transcript} -> common.cached_answers, .prompt_pieces
                 \\n\\n\\n###[Assistant]:                   (CONTINUE_INSTRUCTION, BLSP_TEMPLATE)
          decoded as written, not stripped            -> common.answer_text (tokenized again as
                                                          the target: the tokens the LLM wrote)
  adapter: 3 x (Conv1d k5 s2 p2 + GLU)                -> Adapter.convs, Adapter.forward
           length L -> floor((L-1)/2)+1 per layer     -> Adapter.output_lengths
           x + W2 GELU(W1 x) (512, no bias), LayerNorm -> Adapter.bottleneck, Adapter.norm
  step 2 input: [BOS] ###[Human]:{instruction}        -> behaviour_sample()
                + speech + \\n\\n\\n###[Assistant]: + continuation + EOS
  step 2 loss: CE on continuation + EOS only          -> behaviour_loss() (labels: common.splice,
                                                          -100 where not a target; the mean over
                                                          the step's target tokens: common.train)
  inference: instruction + speech, greedy, 128 tokens -> infer() / common.respond()

Project choices (not in the paper): the encoder runs on the batch's real length, not padded to 30 s
(a short clip's frames then differ from the released code's, whose Whisper also attends to the
silence padded up to 30 s; --whisper-30s runs it that way), and the adapter zeroes padding frames
before each convolution, so a clip's speech vectors do not depend on what else is in its batch; the
final LayerNorm's gain starts at the RMS of the LLM's token embeddings (not 1), so that speech
vectors enter at the scale of text embeddings; an LLM whose tokenizer has a chat template (an
instruct model, or a base one that ships it) gets its chat template around the same pieces
(--prompt blsp forces BLSP's template), and its continuations then end with the token that
closes the assistant's turn (common.answer_end: <|im_end|>, <|eot_id|>); [BOS] only where the
tokenizer starts a text with it (Llama; not SmolLM2, Qwen: common.bos_ids); the prompt is
tokenized in pieces around the transcript or speech (as the released step 2 does; its step 1
tokenizes it whole: a legacy SentencePiece tokenizer, Llama-2's, starts the piece after it with a
lone "▁" in step 2 only); step 2 packs the pieces with no gap (common.splice; the released step 2
places the batch-padded speech between the prompt and the suffix and masks it, but passes no
position ids, so a shorter clip's suffix and continuation get positions shifted by its padding);
the loss is a mean over all target tokens of an optimizer step, across --grad-accum and processes
(the released code: a mean per micro-batch); the optimizer settings are common.Args' (AdamW betas
0.9, 0.999, weight decay 0.05 on matrices, clip 1.0, linear decay);
transcripts are normalised keeping apostrophes and digits ("don't", not "don t"); default
hyper-parameters are scaled to the toy setting (the released code: lr 5e-5, batch 768, 1000
warm-up steps, 1 epoch, clip 1.0, weight decay 0.05): batch 32, lr 1.5e-3, 40 warm-up steps, 800
steps (about 1 min on one CPU thread). Measured with the built-in models (valid, content_acc from
speech / repeat_wer): 0.998 / 0.28 at 800 steps (content_acc is 0.998 at step 400 on a second build
of the LLM, whose repeat_wer stays at 0.47-0.48 up to step 1700). The repeat figure is the paper's weak point,
measured: the CE on continuations asks the adapter only for what a continuation uses (here the two
nouns and the verb, in a code the LLM reads in that context), never for the adjectives nor for
vectors that read like the words themselves, so "repeat" drops or swaps words; BLSP-KD's input KL
asks for exactly that.
"""
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import arg, speech, text

CONTINUE_INSTRUCTION = ("Continue the following text in a coherent and engaging style with less "
                        "than 40 words.")


@dataclass
class BLSPArgs(common.Args):
    bottleneck: int = arg(512, "width of the adapter's residual bottleneck (released code: 512)", min=1)
    continuation_tokens: int = arg(64, "step 1: at most this many new tokens per continuation", min=1)
    gen_batch_size: int = arg(64, "step 1: transcripts per generation batch", min=1)
    steps: int = arg(800, "optimizer steps")
    batch_size: int = arg(32, "utterances per micro-batch (per process; released code: 768 in all)")
    lr: float = arg(1.5e-3, "peak learning rate (released code: 5e-5 at batch 768)")
    warmup: int = arg(40, "warm-up steps (released code: 1000)")
    max_new_tokens: int = arg(128, "generation length limit (released code: 128); the zero-shot "
                                   "repeat of the validation and --eval stops sooner, at twice the "
                                   "batch's longest transcript's tokens + 8 (at least 64)")


MODEL_FIELDS = ("llm", "encoder", "encoder_layer", "whisper_30s", "bottleneck")   # what a run fixes

# ----------------------------------------------------------------------------------------------
# The adapter: the only trained part

class Adapter(nn.Module):
    """Encoder frames (B, T, d_enc) -> speech vectors (B, ~T/8, d_llm) in the LLM's input space."""

    def __init__(self, d_enc, d_llm, bottleneck=512, embed_rms=1.0):
        super().__init__()
        # Conv1d doubles the channels, GLU halves them: d_enc -> d_enc -> d_enc -> d_llm
        self.convs = nn.ModuleList([nn.Conv1d(d_enc, 2 * d_enc, 5, 2, 2),
                                    nn.Conv1d(d_enc, 2 * d_enc, 5, 2, 2),
                                    nn.Conv1d(d_enc, 2 * d_llm, 5, 2, 2)])
        self.bottleneck = nn.Sequential(nn.Linear(d_llm, bottleneck, bias=False), nn.GELU(),
                                        nn.Linear(bottleneck, d_llm, bias=False))
        self.norm = nn.LayerNorm(d_llm)
        nn.init.constant_(self.norm.weight, embed_rms)   # start at the scale of the LLM's embeddings

    @staticmethod
    def output_lengths(lens):
        for _ in range(3):
            lens = (lens - 1) // 2 + 1      # Conv1d(k=5, s=2, p=2): floor((L-1)/2)+1
        return lens

    def forward(self, frames, lens):
        x = frames.transpose(1, 2)                                            # (B, d, T)
        for conv in self.convs:
            keep = torch.arange(x.shape[-1], device=x.device)[None] < lens[:, None]
            x = x * keep[:, None, :].to(x.dtype)                              # padding -> zeros
            x = F.glu(conv(x), dim=1)
            lens = (lens - 1) // 2 + 1                                        # output_lengths, per layer
        x = x.transpose(1, 2)
        x = x + self.bottleneck(x)                                            # x + W2 GELU(W1 x)
        return self.norm(x), lens


def speech_vectors(encoder, adapter, batch):
    """wave -> frozen encoder -> adapter -> one tensor of speech vectors per utterance (their
    counts computed on the host, from the clip lengths)."""
    with torch.no_grad():
        frames, lens = encoder(batch["wave"], batch["wave_lens"])
    vecs, _ = adapter(frames, lens)
    n = adapter.output_lengths(encoder.output_lengths(batch["wave_lens"]))
    return [v[:k] for v, k in zip(vecs, n.tolist())]


# ----------------------------------------------------------------------------------------------
# Step 1: continuation writing by the frozen LLM

def continuation_data(llm, tok, items, args, out_dir, tag, reuse_dirs=()):
    """Ask the frozen LLM to continue each transcript (greedy); cached in out_dir (copied from
    reuse_dirs': a run resumed into another --out), resumable.
    Adds item["continuation_llm"] (text)."""
    transcripts = [common.normalize(it["text"]) for it in items]   # lower case, no punctuation
    conts = common.cached_answers(llm, tok, CONTINUE_INSTRUCTION, transcripts, args,
                                  args.continuation_tokens, out_dir, tag, reuse_dirs=reuse_dirs)
    for it, c in zip(items, conts):
        it["continuation_llm"] = c
    return items


# ----------------------------------------------------------------------------------------------
# Step 2: behaviour alignment

def behaviour_sample(before, vectors, after, continuation_ids, eos):
    """[BOS] ###[Human]:{instruction} <speech> \\n\\n\\n###[Assistant]: continuation EOS;
    only the continuation and EOS are targets."""
    return [text(before), speech(vectors), text(after), text(continuation_ids + [eos], loss=True)]


def behaviour_loss(llm, embed, samples):
    """CE on the continuation + EOS -> (loss sum, number of target tokens, the Spliced batch).
    The batch's n_tokens and llm_tokens (the positions the LLM ran: the instruction every sample
    shares runs once, common.hidden_states) feed the logs and the FLOP count."""
    sp = common.splice(embed, samples)
    loss, n = common.lm_loss(llm, common.hidden_states(llm, sp), sp)
    return loss, n, sp


def step_flops(encoder, adapter, llm):
    """-> flops(frames, tokens, rows): a step's model FLOPs (common.matrices): the frozen encoder's
    forward (2N), the trained adapter (6N, each layer at its output's rate: T/2, T/4, T/8 and the
    bottleneck at T/8), the frozen LLM's forward and input gradients (4N) at the positions it ran
    (a shared prefix once: its 2N forward counted as 4N, a slight overcount), its output layer at
    the loss rows only."""
    n_enc, (n_llm, n_head) = common.matrices(encoder), common.llm_matrices(llm)
    n_ad = sum(common.matrices(conv) / 2 ** (k + 1) for k, conv in enumerate(adapter.convs)) \
        + common.matrices(adapter.bottleneck) / 8                   # per encoder frame
    return lambda frames, tokens, rows: (2 * n_enc + 6 * n_ad) * frames + 4 * n_llm * tokens + 4 * n_head * rows


# ----------------------------------------------------------------------------------------------
# Inference and evaluation of a trained adapter

def load_run(args, device):
    """--ckpt run directory -> (encoder, adapter, llm, tok); args takes the run's config (its
    prompt format, generation lengths and --instruction unless given: --eval then measures as its
    validation)."""
    shape = ("encoder_layer", "whisper_30s", "bottleneck")
    free = ("prompt", "continuation_tokens", "max_new_tokens", "instruction")
    ck = common.take_run_config(args, args.ckpt, "blsp", ("llm", "encoder") + shape + free, fixed=shape, free=free)
    encoder = common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s)
    llm, tok = common.load_llm(args.llm, device)
    adapter = Adapter(encoder.dim, llm.config.hidden_size, args.bottleneck).to(device)
    common.load_trainable(adapter, ck).eval()
    return encoder, adapter, llm, tok


def infer(args, device):
    encoder, adapter, llm, tok = load_run(args, device)
    if args.infer:
        batch = common.infer_batch(args, encoder, device)
        with torch.no_grad(), common.autocast(device):
            vecs = speech_vectors(encoder, adapter, batch)
            ins = args.instruction if common.given(args, "instruction") else CONTINUE_INSTRUCTION
            print(common.respond(llm, tok, [speech(vecs[0])], ins, args.prompt, args.max_new_tokens)[0])
    if args.eval:
        items = common.eval_items(args, encoder)
        todo = [it for it in items if "continuation" not in it]
        for it in continuation_data(llm, tok, todo, args, args.ckpt, "eval"):
            it["continuation"] = it["continuation_llm"]
        with torch.no_grad():
            res = common.alignment_eval(
                llm, tok, items, args, device, lambda b: speech_vectors(encoder, adapter, b),
                CONTINUE_INSTRUCTION, args.instruction or data.REPEAT_INSTRUCTIONS[0])
        res["alignment_gap"] = res["loss_speech"] - res["loss_text"]
        print(json.dumps(common.json_safe(res), indent=1))


# ----------------------------------------------------------------------------------------------

@common.guard
def main(argv=None):
    args = common.parse_args(BLSPArgs, argv, method="blsp")
    device, rank, world = common.setup(args)
    if args.ckpt:
        return infer(args, device)
    args.out = args.out or args.resume or "runs/blsp"          # (--resume DIR continues in DIR)
    common.check_out(args, method="blsp", model_fields=MODEL_FIELDS)   # before the continuations
    encoder = common.load_encoder(args.encoder, device, args.encoder_layer, args.whisper_30s)
    llm, tok = common.load_llm(args.llm, device, grad_ckpt=args.grad_ckpt)
    train_items, valid_items = common.manifests(args, encoder)

    if rank == 0 and not args.resume:     # (a stop while they are generated: --resume takes it)
        common.write_config(args, args.out, "blsp")
    # step 1: the LLM's own continuations are the targets (train); valid items without a
    # reference continuation get one too, to measure the speech-vs-text gap
    continuation_data(llm, tok, train_items, args, args.out, "train", [args.resume])
    todo = [it for it in valid_items if "continuation" not in it]
    for it in continuation_data(llm, tok, todo, args, args.out, "valid", [args.resume]):
        it["continuation"] = it["continuation_llm"]
    continuations = [it["continuation_llm"] for it in train_items]
    for it, ids in zip(train_items, common.cached_ids(tok, continuations, args.out, "train", reuse_dirs=[args.resume])):
        it["continuation_ids"] = ids

    # step 2: behaviour alignment; only the adapter trains
    embed, eos = llm.get_input_embeddings(), common.answer_end(llm, tok, args.prompt)
    adapter = Adapter(encoder.dim, llm.config.hidden_size, args.bottleneck,
                      embed_rms=float(embed.weight.float().pow(2).mean().sqrt())).to(device)
    common.compile_adapter(adapter, args)
    before, after = common.prompt_pieces(tok, CONTINUE_INSTRUCTION, args.prompt)

    flops = step_flops(encoder, adapter, llm)

    def step_fn(batch):
        vecs = speech_vectors(encoder, adapter, batch)
        samples = [behaviour_sample(before, v, after, ids, eos)
                   for v, ids in zip(vecs, batch["continuation_ids"])]
        loss, n, sp = behaviour_loss(llm, embed, samples)
        return loss, n, dict(tokens=sp.n_tokens, flops=flops(encoder.frames, sp.llm_tokens, n))

    def valid_fn(step):
        adapter.eval()
        with torch.no_grad():
            res = common.alignment_eval(llm, tok, valid_items, args, device,
                                        lambda b: speech_vectors(encoder, adapter, b),
                                        CONTINUE_INSTRUCTION, args.instruction or data.REPEAT_INSTRUCTIONS[0])
        adapter.train()
        return res

    res = common.train(args, adapter, step_fn, train_items, device, rank, world, valid_fn,
                       method="blsp", model_fields=MODEL_FIELDS)
    if rank == 0:
        adapter.eval()
        common.show_sample(llm, tok, valid_items, args, device, lambda b: speech_vectors(encoder, adapter, b),
                           CONTINUE_INSTRUCTION)
        print("final: " + json.dumps(common.json_safe({k: v for k, v in res.items() if k != "repeat_example"})))


if __name__ == "__main__":
    main()
