"""Tests of blsp_kd.py on tiny models built from configs (CPU, no cached defaults)."""
import json
import os
import random
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import blsp_kd
import common
import data
from common import speech, text


# ----------------------------------------------------------------------------------------------
# tiny models

def tiny_llm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tok = common.default_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, initializer_range=0.2)
    return common.freeze(LlamaForCausalLM(cfg)), tok


def tiny_whisper():
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(1)
    cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return WhisperModel(cfg)


def loss_args(**kw):
    a = dict(length_loss=True, response_kl=True, input_kl=True, response_ce=True, temperature=2.0,
             unfreeze_encoder=False)
    return SimpleNamespace(**dict(a, **kw))


# ----------------------------------------------------------------------------------------------
# CIF

def cif_loop(alpha, h, n):
    """Plain frame-by-frame integrate-and-fire at threshold 1; the last token takes the tail."""
    outs, sums = [], []
    acc_w, acc_h = 0.0, torch.zeros(h.shape[1], dtype=h.dtype)
    for t in range(len(alpha)):
        a = float(alpha[t])
        while acc_w + a >= 1.0 and len(outs) < n - 1:      # fire (maybe several times a frame)
            part = 1.0 - acc_w
            outs.append(acc_h + part * h[t])
            sums.append(acc_w + part)
            a -= part
            acc_w, acc_h = 0.0, torch.zeros_like(acc_h)
        acc_w += a
        acc_h = acc_h + a * h[t]
    outs.append(acc_h)
    sums.append(acc_w)
    return torch.stack(outs), torch.tensor(sums, dtype=h.dtype)


def check_against_loop(alpha, lens, n, D=5):
    B, T = alpha.shape
    h = torch.randn(B, T, D, dtype=torch.float64)
    w = blsp_kd.cif_weights(alpha, n)
    assert w.shape == (B, int(n.max()), T)
    out = torch.bmm(w, h)
    for b in range(B):
        k = int(n[b])
        ref, ref_sums = cif_loop(alpha[b, :lens[b]], h[b, :lens[b]], k)
        assert ref.shape[0] == k
        torch.testing.assert_close(out[b, :k], ref, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(w[b, :k].sum(-1), ref_sums, atol=1e-9, rtol=1e-9)
        assert (w[b, k:] == 0).all() and (w[b, :, lens[b]:] == 0).all()
        torch.testing.assert_close(w[b].sum(0), alpha[b])       # each frame's weight is spent


def test_cif_closed_form_equals_loop_random_padded():
    torch.manual_seed(0)
    for _ in range(20):
        B = 4
        lens = torch.randint(1, 16, (B,))
        lens[0] = 16
        n = torch.randint(1, 9, (B,))
        n[1] = 1                                                  # N = 1
        n[2] = int(lens[2]) * 2 + 1                               # weights above 1 in a frame
        mask = torch.arange(16)[None] < lens[:, None]
        alpha = torch.rand(B, 16, dtype=torch.float64) * mask
        scaled = blsp_kd.rescale(alpha, n)
        torch.testing.assert_close(scaled.sum(1), n.double())    # rescaled weights sum to N
        assert (scaled[~mask] == 0).all()
        check_against_loop(scaled, lens, n)


def test_cif_fires_in_the_last_frame():
    alpha = torch.tensor([[0.3, 0.3, 2.4], [0.5, 0.5, 1.0]], dtype=torch.float64)
    n = torch.tensor([3, 2])
    check_against_loop(alpha, torch.tensor([3, 3]), n)
    w = blsp_kd.cif_weights(alpha, n)
    torch.testing.assert_close(w[0], torch.tensor([[0.3, 0.3, 0.4], [0, 0, 1.0], [0, 0, 1.0]],
                                                  dtype=torch.float64))


def test_cif_is_differentiable_in_alpha():
    torch.manual_seed(1)
    alpha = (torch.rand(2, 7, dtype=torch.float64) + 0.1).requires_grad_()
    n = torch.tensor([3, 2])
    torch.autograd.gradcheck(lambda a: blsp_kd.cif_weights(blsp_kd.rescale(a, n), n), (alpha,))


def test_cformer_counts_and_padding_independence():
    torch.manual_seed(0)
    cf = blsp_kd.CFormer(8, 6, 1, 1, 2).eval()
    frames, lens = torch.randn(2, 20, 8), torch.tensor([20, 11])
    vecs, n, total = cf(frames, lens, torch.tensor([4, 2]))
    assert vecs.shape == (2, 4, 6) and n.tolist() == [4, 2]
    alone, _, _ = cf(frames[1:, :11], lens[1:], torch.tensor([2]))
    torch.testing.assert_close(vecs[1, :2], alone[0], atol=1e-5, rtol=1e-5)
    _, n_inf, total = cf(frames, lens)                            # inference: round(sum alpha)
    assert n_inf.tolist() == [max(1, round(float(t))) for t in total.detach()]


# ----------------------------------------------------------------------------------------------
# KD losses against two separate, plain LLM calls

def test_kd_losses_equal_direct_computation():
    llm, tok = tiny_llm()
    before, after = common.prompt_pieces(tok, blsp_kd.CONTINUE_INSTRUCTION)
    torch.manual_seed(3)
    trs = [common.input_ids(tok, "the old fox sees the cat"), common.input_ids(tok, "the dog helps the king")]
    resps = [common.target_ids(tok, "then the cat sees the fox again") + [tok.eos_token_id],
             common.target_ids(tok, "then the king")]
    vecs = [torch.randn(len(t), 32) for t in trs]
    total, n = torch.tensor([7.5, 4.0]), torch.tensor([6, 5])
    pairs = [blsp_kd.kd_pair(before, after, t, v, r) for t, v, r in zip(trs, vecs, resps)]
    got, k = blsp_kd.kd_losses(llm, None, *zip(*pairs), loss_args(), total, n)

    emb = llm.get_input_embeddings()
    rkl, ikl, ce = [], [], []
    for t, v, r in zip(trs, vecs, resps):
        lt = llm(input_ids=torch.tensor([before + t + after + r])).logits[0].double()
        es = torch.cat([emb(torch.tensor(before)), v, emb(torch.tensor(after + r))])
        ls = llm(inputs_embeds=es[None]).logits[0].double()
        r0 = len(before) + len(t) + len(after) - 1                  # predicts the first response token
        for pos, out in [(range(r0, r0 + len(r)), rkl), (range(len(before), len(before) + len(t)), ikl)]:
            for p in pos:
                pt, ps = torch.softmax(lt[p] / 2, -1), torch.softmax(ls[p] / 2, -1)
                out.append(float((pt * (pt.log() - ps.log())).sum()))
        ce += [float(-torch.log_softmax(ls[r0 + j], -1)[r[j]]) for j in range(len(r))]
    assert k == sum(len(r) for r in resps)
    assert got["response_kl"].item() == pytest.approx(sum(rkl) / len(rkl), rel=1e-4)
    assert got["input_kl"].item() == pytest.approx(sum(ikl) / len(ikl), rel=1e-4)
    assert got["response_ce"].item() == pytest.approx(sum(ce) / len(ce), rel=1e-5)
    assert got["length"].item() == pytest.approx((1.5 / 6 + 1.0 / 5) / 2, rel=1e-6)
    assert min(rkl) >= 0 and got["input_kl"] > 1e-4                # non-trivial: can fail


# ----------------------------------------------------------------------------------------------
# Partial LoRA

def test_plora_teacher_and_text_positions_are_the_frozen_llm():
    llm, tok = tiny_llm()
    emb = llm.get_input_embeddings()
    torch.manual_seed(5)
    before, after = common.prompt_pieces(tok, blsp_kd.CONTINUE_INSTRUCTION)
    tr = common.input_ids(tok, "the red cat sees the dog")
    sp_text = common.splice(emb, [[text(before), text(tr), text(after)]] * 2)
    sp_speech = common.splice(emb, [[text(before), speech(torch.randn(4, 32)), text(after)],
                                    [text(before), speech(torch.randn(6, 32)), text(after)]])
    base_text, base_speech = common.hidden_states(llm, sp_text), common.hidden_states(llm, sp_speech)
    ctx, layers = common.add_lora(llm, r=4, alpha=4, dropout=0.05, masked=True)
    layers.eval()
    for m in layers:                                            # a non-zero update everywhere
        torch.nn.init.normal_(m.lora_B, std=0.5)
    assert torch.equal(blsp_kd.llm_pass(llm, sp_speech, ctx, student=False), base_speech)  # teacher
    assert torch.equal(blsp_kd.llm_pass(llm, sp_text, ctx, student=True), base_text)      # mask 0
    h = blsp_kd.llm_pass(llm, sp_speech, ctx, student=True)
    first = len(before)
    assert torch.equal(h[:, :first], base_speech[:, :first])    # causal: before speech untouched
    assert not torch.allclose(h[:, first:], base_speech[:, first:], atol=1e-3)
    assert ctx.enabled and ctx.mask is None                     # switches restored


# ----------------------------------------------------------------------------------------------
# Gradients reach the trained parts only

def toy_batch(tok, sentences, seed=0):
    rng = random.Random(seed)
    rows = []
    for s in sentences:
        wave, _ = data.synthesize(s, rng)
        cont = data.toy_tasks(s)["continuation"]
        rows.append(dict(wave=torch.from_numpy(wave), text=s, transcript_ids=common.input_ids(tok, s),
                         response_ids=common.target_ids(tok, cont) + [tok.eos_token_id]))
    return data.collate(rows)


@pytest.mark.parametrize("stage,unfreeze", [(1, False), (2, False), (2, True)])
def test_only_trained_parts_get_gradients(stage, unfreeze):
    llm, tok = tiny_llm()
    from transformers import WhisperFeatureExtractor
    w = tiny_whisper()
    encoder = common.freeze(common.SpeechEncoder(w.encoder, "whisper",
                                                 WhisperFeatureExtractor(feature_size=80).mel_filters))
    args = loss_args(unfreeze_encoder=unfreeze, stage=stage, pre_layers=1, post_layers=1, heads=2,
                     ffn=0, dropout=0.0, lora_r=4, lora_alpha=4.0, lora_dropout=0.0)
    module, cformer, ctx = blsp_kd.build(args, torch.device("cpu"), encoder, llm)
    before, after = common.prompt_pieces(tok, blsp_kd.CONTINUE_INSTRUCTION)
    batch = toy_batch(tok, ["the cat sees the dog", "the old king helps the small bird"])
    loss, k, logs = blsp_kd.kd_step(encoder, cformer, llm, ctx, before, after, batch, args)
    (loss / k).backward()
    assert set(logs) == {"length", "response_kl", "input_kl", "response_ce"}
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert all(p.grad is not None for p in cformer.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in cformer.pre.parameters())
    if stage == 2:
        assert all(m.lora_B.grad is not None and float(m.lora_B.grad.abs().sum()) > 0
                   for m in module["lora"])
    else:
        assert "lora" not in module
    for name, p in list(llm.named_parameters()) + list(encoder.named_parameters()):
        if id(p) in trained:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert any(id(p) in trained for p in encoder.model.parameters()) == unfreeze


# ----------------------------------------------------------------------------------------------
# main() end to end: stage 1, stage 2, eval, inference, a bad argument

def write_manifest(folder, name, sentences, seed):
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
        for i, s in enumerate(sentences):
            wave, _ = data.synthesize(s, rng)
            sf.write(os.path.join(folder, name, f"{i}.wav"), wave, data.SAMPLE_RATE)
            f.write(json.dumps(dict(audio=f"{name}/{i}.wav", text=s, duration=len(wave) / 16000,
                                    **data.toy_tasks(s))) + "\n")
    return os.path.join(folder, f"{name}.jsonl")


def test_main_stage1_stage2_eval(tmp_path, capsys):
    llm, tok = tiny_llm()
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    tiny_whisper().save_pretrained(tmp_path / "enc")
    rng = random.Random(0)
    train = write_manifest(tmp_path, "train", [data.toy_sentence(rng) for _ in range(16)], 1)
    valid = write_manifest(tmp_path, "valid", [data.toy_sentence(rng) for _ in range(3)], 2)
    common_args = ["--llm", str(tmp_path / "llm"), "--encoder", str(tmp_path / "enc"), "--train", train,
                   "--valid", valid, "--device", "cpu", "--batch-size", "8", "--log-every", "1",
                   "--pre-layers", "1", "--post-layers", "1", "--heads", "2", "--max-new-tokens", "6",
                   "--continuation-tokens", "6", "--warmup", "2"]
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    blsp_kd.main(common_args + ["--out", s1, "--steps", "24", "--lr", "3e-3"])
    rows = [json.loads(l) for l in open(os.path.join(s1, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("split") != "valid"]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4])
    valid_row = [r for r in rows if r.get("split") == "valid"][-1]
    for key in ("content_acc", "repeat_wer", "count_err", "response_kl", "input_kl", "tokens_pred"):
        assert key in valid_row

    blsp_kd.main(common_args + ["--out", s2, "--steps", "3", "--stage", "2", "--init", s1])
    from safetensors.torch import load_file
    state = load_file(os.path.join(common.find_checkpoint(s2), "trainable.safetensors"))
    assert any(k.startswith("lora.") for k in state) and any(k.startswith("cformer.") for k in state)
    first_row = json.loads(open(os.path.join(s2, "metrics.jsonl")).readline())
    assert first_row["loss"] < losses[0]                        # starts from the stage-1 CFormer

    capsys.readouterr()
    blsp_kd.main(["--ckpt", s2, "--eval", valid, "--device", "cpu", "--max-new-tokens", "4",
                  "--infer", str(tmp_path / "valid" / "0.wav")])
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{"):])
    assert {"content_acc", "repeat_wer", "count_err", "response_kl", "input_kl"} <= set(res)

    with pytest.raises(SystemExit) as e:
        blsp_kd.main(common_args + ["--out", str(tmp_path / "bad"), "--stage", "2"])
    assert e.value.code == 2 and "--init" in capsys.readouterr().err
