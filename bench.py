"""Throughput and memory of the training steps, against the official recipes' design choices.

Each method's full training step (encoder forward, adapter, LLM forward and backward, AdamW) runs on
synthetic batches whose durations follow a LibriSpeech-like spread (2-20 s, log-normal around 12 s),
with models built from config at a chosen scale (random weights: speed does not depend on them):

    --scale tiny    a 2-layer 64-d Whisper-style encoder, a 2-layer 64-d Llama (CPU, seconds)
    --scale small   a Whisper-base-sized encoder (6 x 512) and a ~135M Llama (SmolLM2-135M shape)
    --scale paper   a Whisper-small-sized encoder (12 x 768) and a 7B Llama-2 shape (GPU only)

Reported per variant: samples/s, audio seconds per second, LLM tokens/s, padding fraction, peak memory
(CUDA: max_memory_allocated; CPU: the process's peak RSS, each variant in its own process) and, on CUDA,
MFU = model FLOPs / time / bf16 peak, counting 2N FLOPs per token for frozen forward-only passes
(the encoder), 4N for frozen layers that pass gradients back (the LLM: forward + input gradients),
6N for trained weights (the adapter), N = parameters of the matrices the token goes through.

Variants, measured with the same models in the same run, reported as ratios:
    blsp          real-length encoder, length-bucketed batches (this project)
    blsp-30s      the encoder run on clips padded to 30 s, cropped after (the released BLSP code)
    blsp-nobucket real length, but batches drawn at random (no length buckets)
    blsp-ckpt     blsp with activation checkpointing of the frozen LLM (--grad-ckpt)
    kd-select     BLSP-KD-style response KL with fp32 logits only at the loss positions, chunked
    kd-full       the same KL from the full (B, T, V) fp32 logits of the whole sequence
Usage: python bench.py --scale tiny [--device cuda] [--steps 5] [--vocab 151936]
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import blsp
import common
import data

SCALES = dict(
    tiny=dict(enc=dict(d=64, layers=2, heads=2), llm=dict(d=64, layers=2, heads=2, ffn=128), batch=4),
    small=dict(enc=dict(d=512, layers=6, heads=8), llm=dict(d=576, layers=30, heads=9, ffn=1536), batch=8),
    paper=dict(enc=dict(d=768, layers=12, heads=12), llm=dict(d=4096, layers=32, heads=32, ffn=11008),
               batch=16))


def durations(n, rng):
    """LibriSpeech-like: log-normal around 12 s, clipped to 2-20 s."""
    return [min(20.0, max(2.0, rng.lognormvariate(2.45, 0.45))) for _ in range(n)]


def build(scale, vocab, device):
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor, WhisperModel
    s = SCALES[scale]
    e, l = s["enc"], s["llm"]
    torch.manual_seed(0)
    wcfg = WhisperConfig(num_mel_bins=80, d_model=e["d"], encoder_layers=e["layers"],
                         encoder_attention_heads=e["heads"], encoder_ffn_dim=4 * e["d"], decoder_layers=1,
                         decoder_attention_heads=e["heads"], decoder_ffn_dim=64, max_source_positions=1500,
                         max_target_positions=16, vocab_size=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)
    dtype = common.frozen_dtype(device)
    whisper = WhisperModel(wcfg)
    enc = common.SpeechEncoder(whisper.encoder, "whisper", WhisperFeatureExtractor(feature_size=80).mel_filters)
    enc = common.freeze(enc).to(device=device, dtype=dtype)
    enc.mel_filters = enc.mel_filters.float()
    lcfg = LlamaConfig(vocab_size=vocab, hidden_size=l["d"], num_hidden_layers=l["layers"],
                       num_attention_heads=l["heads"], num_key_value_heads=l["heads"],
                       intermediate_size=l["ffn"], tie_word_embeddings=False)
    lcfg._attn_implementation = "sdpa"
    llm = common.freeze(LlamaForCausalLM(lcfg).to(device=device, dtype=dtype))
    return enc, llm


def batches(variant, n_batches, batch, rng):
    """The same n_batches x batch clips for every variant (so throughputs compare), grouped by
    length buckets or at random; plus one warm-up batch of 10 s clips, not timed."""
    durs = durations(n_batches * batch, rng)
    if variant == "blsp-nobucket":
        idx = list(range(len(durs)))
        rng.shuffle(idx)
        out = [idx[i:i + batch] for i in range(0, len(idx), batch)]
    else:
        out = data.BucketBatchSampler(durs, batch, seed=0).batches()
    real = sum(durs)
    padded = sum(max(durs[i] for i in b) * len(b) for b in out)
    return [[10.0] * batch] + [[durs[i] for i in b] for b in out], 1 - real / padded


def run_variant(variant, args):
    device = torch.device(args.device)
    rng = random.Random(0)
    vocab = args.vocab if variant.startswith("kd") else 32000
    enc, llm = build(args.scale, vocab, device)
    if variant == "blsp-ckpt":                            # what --grad-ckpt does
        common.enable_checkpointing(llm)
    s = SCALES[args.scale]
    adapter = blsp.Adapter(enc.dim, llm.config.hidden_size).to(device)
    opt = common.make_optimizer(adapter.parameters(), common.Args(lr=1e-4), device)
    embed = llm.get_input_embeddings()
    bl, pad = batches(variant, args.steps, s["batch"], rng)
    prompt, cont = list(range(5, 40)), 48                 # prompt tokens; continuation length
    t0, audio, tokens, flops = None, 0.0, 0, 0.0
    n_enc = sum(p.numel() for p in enc.parameters() if p.ndim == 2 or p.ndim == 3)
    n_llm = sum(p.numel() for n, p in llm.named_parameters() if p.ndim == 2 and "embed" not in n)
    n_ad = sum(p.numel() for p in adapter.parameters() if p.ndim >= 2)
    for k, durs in enumerate(bl):
        if k == 1:                                        # step 0 warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
        lens = torch.tensor([int(d * 16000) for d in durs], device=device)
        wave = torch.randn(len(durs), int(lens.max()), device=device) * 0.1
        with common.autocast(device):
            with torch.no_grad():
                if variant == "blsp-30s":                 # the released code: pad every clip to 30 s
                    w30 = F.pad(wave, (0, 480000 - wave.shape[1]))
                    feats, flens = data.whisper_log_mel(w30, torch.full_like(lens, 480000), enc.mel_filters)
                    frames, _ = enc.whisper_forward(feats.to(next(enc.parameters()).dtype), flens)
                    flens = (lens // 160 - 1) // 2 + 1
                    frames = frames[:, :int(flens.max())]
                else:
                    frames, flens = enc(wave, lens)
            vecs, vlens = adapter(frames, flens)
            ids = torch.randint(100, vocab, (len(durs), cont)).tolist()
            samples = [[common.text(prompt), common.speech(v[:n]), common.text(i, loss=True)]
                       for v, n, i in zip(vecs, vlens.tolist(), ids)]
            sp = common.splice(embed, samples)
            h = common.hidden_states(llm, sp)
            if variant == "kd-full":                      # full-sequence fp32 logits, then select
                logits = llm.lm_head(h).float()
                sel = F.pad(sp.labels[:, 1:] != -100, (0, 1))
                student = logits[sel]
            else:
                student = common.logits_at(llm, h, F.pad(sp.labels[:, 1:] != -100, (0, 1)))
            if variant.startswith("kd"):                  # KL against a fixed random teacher, T = 2
                teacher = torch.randn_like(student)
                loss = F.kl_div((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1),
                                log_target=True, reduction="sum")
            else:
                loss = F.cross_entropy(student, sp.labels[:, 1:][sp.labels[:, 1:] != -100], reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= 1:
            T_enc = frames.shape[0] * frames.shape[1] * 2   # mel frames are 2x encoder frames (conv)
            T_llm = int(sp.attention_mask.numel())
            audio += sum(durs)
            tokens += T_llm
            flops += 2 * n_enc * T_enc / 2 + 4 * n_llm * T_llm + 6 * n_ad * frames.shape[0] * frames.shape[1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    res = dict(variant=variant, samples_per_s=args.steps * s["batch"] / dt, audio_s_per_s=audio / dt,
               llm_tokens_per_s=tokens / dt, padding=pad, step_s=dt / args.steps)
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        res["mfu"] = flops / dt / common.peak_flops(device)
    else:
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="tiny", choices=list(SCALES), help="model sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary of the KD variants (Qwen: 151936)")
    p.add_argument("--variants", default="blsp,blsp-30s,blsp-nobucket,blsp-ckpt,kd-select,kd-full",
                   help="comma-separated variants")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one variant
    args = p.parse_args()
    if args.scale == "paper" and args.device == "cpu":
        sys.exit("error: --scale paper needs a GPU (--device cuda)")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    rows = {}
    for v in args.variants.split(","):                    # one process per variant: clean peak memory
        cmd = [sys.executable, __file__, "--one", v, "--scale", args.scale, "--device", args.device,
               "--steps", str(args.steps), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: variant {v} failed:\n{out.stderr[-2000:]}")
        rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
    mem = "peak_mem_gib" if args.device == "cuda" else "peak_rss_gib"
    print(f"scale={args.scale} device={args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} CPU cores'})")
    print(f"{'variant':15s} {'samples/s':>10s} {'audio s/s':>10s} {'tokens/s':>10s} {'padding':>8s} "
          f"{mem:>13s}" + (f" {'MFU':>6s}" if args.device == "cuda" else ""))
    for v, r in rows.items():
        print(f"{v:15s} {r['samples_per_s']:10.2f} {r['audio_s_per_s']:10.1f} {r['llm_tokens_per_s']:10.0f} "
              f"{r['padding']:8.1%} {r[mem]:13.2f}" + (f" {r['mfu']:6.1%}" if 'mfu' in r else ""))
    if "blsp" in rows and "blsp-30s" in rows:
        print(f"BLSP step: {rows['blsp']['samples_per_s'] / rows['blsp-30s']['samples_per_s']:.1f}x faster "
              "than the 30 s recipe on this spread, measured")
    if "blsp" in rows and "blsp-nobucket" in rows:
        print(f"length buckets: {rows['blsp']['samples_per_s'] / rows['blsp-nobucket']['samples_per_s']:.2f}x "
              f"the throughput of random batches (padding {rows['blsp']['padding']:.1%} vs "
              f"{rows['blsp-nobucket']['padding']:.1%})")
    if "blsp" in rows and "blsp-ckpt" in rows:
        print(f"activation checkpointing of the LLM: peak memory {rows['blsp-ckpt'][mem]:.2f} vs "
              f"{rows['blsp'][mem]:.2f} GiB, {rows['blsp-ckpt']['samples_per_s'] / rows['blsp']['samples_per_s']:.2f}x "
              "the throughput")
    if "kd-select" in rows and "kd-full" in rows:
        print(f"KD logits at loss positions only: peak memory {rows['kd-select'][mem]:.2f} vs "
              f"{rows['kd-full'][mem]:.2f} GiB with full-sequence logits "
              f"({rows['kd-select'][mem] / rows['kd-full'][mem]:.2f}x)")


if __name__ == "__main__":
    main()
