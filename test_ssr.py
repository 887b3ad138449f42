"""Tests of ssr.py on tiny models built from configs (CPU)."""
import itertools
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import common
import data
import ssr


# ---------------------------------------------------------------------------------------------
# characters -> LLM tokens

def test_boundaries_word_level_tokenizer():
    tok = common.default_tokenizer()
    txt = "the red fox"
    enc = tok(" " + txt, return_offsets_mapping=True, add_special_tokens=False)
    frames = {p: 3 * p for p, c in enumerate(" " + txt) if c != " "}
    # the -> 'e' at 3, red -> 'd' at 7, fox -> 'x' at 11
    assert ssr.token_boundaries(enc.offset_mapping, frames, 100) == [9, 21, 33]


def bpe_tokenizer():
    """A small byte-level BPE (GPT-2 style: tokens carry their leading space, 'Ġ')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             special_tokens=["<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(["the red fox sees the cat", "the fox", "red fox"] * 5, tr)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def test_boundaries_bpe_multichar_leading_space_punctuation():
    tok = bpe_tokenizer()
    txt = "the reddish fox, ok"
    enc = tok(" " + txt, return_offsets_mapping=True, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    assert pieces == ["Ġthe", "Ġred", "d", "i", "s", "h", "Ġfox", ",", "Ġ", "o", "k"]
    # aligned characters: letters only (the aligner emits no ','; spaces never end a token)
    frames = {p: 2 * p for p, c in enumerate(" " + txt) if c.isalpha()}
    b = ssr.token_boundaries(enc.offset_mapping, frames, 100)
    # Ġthe->e(3), Ġred->d(7), d(8), i(9), s(10), h(11), Ġfox->x(15), ',' and 'Ġ' take the previous
    # boundary (30) and are pushed to 31, 32; o(18), k(19)
    assert b == [6, 14, 16, 18, 20, 22, 30, 31, 32, 36, 38]


def test_boundaries_same_frame_past_end_and_too_short():
    offs = [(0, 2), (2, 4), (4, 6)]
    frames = {1: 5, 3: 5, 5: 6}                       # two tokens end in frame 5
    assert ssr.token_boundaries(offs, frames, 100) == [5, 6, 7]
    frames = {1: 8, 3: 9, 5: 12}                      # the last token lies past the 10 frames
    assert ssr.token_boundaries(offs, frames, 10) == [7, 8, 9]
    assert ssr.token_boundaries(offs, {}, 10) == [0, 1, 2]   # nothing aligned: 0, 1, 2
    assert ssr.token_boundaries(offs, frames, 2) is None     # 3 tokens cannot fit in 2 frames
    assert ssr.token_boundaries([], frames, 2) == []


def test_ctc_targets_greedy_and_oracle_frames():
    pos, ids = ssr.ctc_targets("Hi,  o ")
    assert [(" Hi,  o "[p].lower(), common.CTC_CHARS[i]) for p, i in zip(pos, ids)] == \
        [("h", "h"), ("i", "i"), (" ", " "), ("o", "o")]
    C = len(common.CTC_CHARS)
    path = ["<blank>", "h", "h", "<blank>", "i", " ", " ", "o", "<blank>"]
    logp = torch.full((len(path), C), -5.0)
    for t, c in enumerate(path):
        logp[t, common.CTC_CHARS.index(c)] = 0.0
    assert ssr.greedy_decode(logp) == ("hi o", {1: 3, 2: 4, 4: 7})   # h lasts until i starts
    chars = [["a", 0.08, 0.13], ["b", 0.13, 0.14]]
    assert ssr.oracle_frames(chars, "ab", 0.02) == {1: 6, 2: 6}
    with pytest.raises(data.DataError):
        ssr.oracle_frames(chars, "ax", 0.02)


# ---------------------------------------------------------------------------------------------
# forced alignment against brute force

def brute_force(logp, targets):
    T, C = logp.shape
    best, arg = -math.inf, None
    for path in itertools.product(range(C), repeat=T):
        collapsed = [k for k, _ in itertools.groupby(path) if k != ssr.BLANK]
        if collapsed == list(targets):
            s = float(sum(logp[t, k] for t, k in enumerate(path)))
            if s > best:
                best, arg = s, list(path)
    return best, arg


@pytest.mark.parametrize("targets", [[1, 2, 2], [1, 3], [2]])
def test_forced_align_equals_brute_force(targets):
    g = torch.Generator().manual_seed(len(targets))
    for _ in range(3):
        logp = torch.randn(6, 4, generator=g).log_softmax(-1)
        best, path = brute_force(logp, targets)
        for fn in (ssr.forced_align, ssr.viterbi_align):
            labels = fn(logp, targets)
            assert labels == path, fn.__name__
            assert abs(sum(float(logp[t, k]) for t, k in enumerate(labels)) - best) < 1e-5


def test_char_frames_from_forced_path():
    C = len(common.CTC_CHARS)
    path = ["<blank>", "a", "a", " ", "<blank>", "b", "<blank>", "b"]    # "a bb"
    logp = torch.full((len(path), C), -9.0)
    for t, c in enumerate(path):
        logp[t, common.CTC_CHARS.index(c)] = 0.0
    logp = logp.log_softmax(-1)
    assert ssr.char_frames(logp, "a bb") == {1: 2, 3: 6, 4: 7}       # spaces are not aligned
    assert ssr.char_frames(logp[:3], "a bb") is None                  # cannot fit in 3 frames


# ---------------------------------------------------------------------------------------------
# masks and connector

def test_masks_against_hand_built():
    assert torch.equal(ssr.causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 1, 1, 0, 0, 0],     # segment 1 = frames 2..3 sees from boundary 1
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],     # after the last boundary: from boundary 3
                         [0, 0, 0, 1, 1, 1]]).bool()
    assert torch.equal(ssr.blockwise_mask([1, 3], 6), want)


@pytest.mark.parametrize("blockwise", [False, True])
def test_connector_one_vector_per_token_and_mask_used(blockwise):
    torch.manual_seed(0)
    con = ssr.Connector(12, 8, layers=2, heads=2, dropout=0.0, blockwise=blockwise).eval()
    frames = torch.randn(2, 9, 12)
    bnds = [[1, 3, 6], [0, 4]]
    out = con(frames, bnds)
    assert [tuple(z.shape) for z in out] == [(3, 8), (2, 8)]
    # a frame's output does not depend on frames it must not see
    frames2 = frames.clone()
    frames2[0, 7:] += 1.0                       # after every boundary of sample 0
    frames2[0, 0] += 1.0 if blockwise else 0.0  # before boundary 1: invisible from segments 2, 3
    out2 = con(frames2, bnds)
    assert torch.allclose(out[0][2], out2[0][2], atol=1e-6)
    assert torch.allclose(out[0][0], out2[0][0], atol=1e-6) != blockwise
    if not blockwise:       # selection: the outputs at the boundary frames of the whole sequence
        full = con(frames, [list(range(9)), list(range(9))])
        assert torch.allclose(full[1][[0, 4]], out[1], atol=1e-6)


def test_distill_loss_equals_direct():
    torch.manual_seed(0)
    z, e = torch.randn(7, 5), torch.randn(7, 5)
    loss, n = ssr.distill_loss(z, e, 5.0)
    direct = 0.0
    for i in range(7):
        mse = sum(float(z[i, d] - e[i, d]) ** 2 for d in range(5))
        cos = float(z[i] @ e[i]) / (float(z[i].norm()) * float(e[i].norm()))
        direct += mse + 5.0 * (1 - cos)
    assert n == 7 and abs(float(loss) / n - direct / 7) < 1e-4


def test_ntp_splice_labels():
    embed = torch.nn.Embedding(20, 4)
    sp = ssr.ntp_splice(embed, [common.speech(torch.randn(3, 4)), common.text([5, 6])],
                        [[7, 8, 9], [5, 6]], [1], 2)
    assert sp.labels.tolist() == [[-100, 7, 8, 9, 2], [-100, 5, 6, 2, -100]]
    assert sp.speech_mask[0, 1:4].all() and not sp.speech_mask[1].any()


# ---------------------------------------------------------------------------------------------
# end to end on tiny models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import (LlamaConfig, LlamaForCausalLM, WhisperConfig,
                              WhisperFeatureExtractor, WhisperModel)
    import soundfile as sf
    root = tmp_path_factory.mktemp("ssr")
    torch.manual_seed(0)
    tok = common.default_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2,
                                       intermediate_size=64, max_position_embeddings=512,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=32, max_source_positions=750, max_target_positions=32,
                        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    WhisperModel(cfg).save_pretrained(root / "enc")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "enc")
    head = torch.nn.Linear(32, len(common.CTC_CHARS))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(root / "enc" / "ctc_head.safetensors"))
    (root / "enc" / "ctc_chars.json").write_text(json.dumps(common.CTC_CHARS))
    rng = random.Random(0)
    os.makedirs(root / "wav")
    with open(root / "m.jsonl", "w") as f:
        for k in range(6):
            s = data.toy_sentence(rng)
            wave, chars = data.synthesize(s, rng)
            sf.write(root / "wav" / f"{k}.wav", wave, data.SAMPLE_RATE)
            f.write(json.dumps(dict(audio=f"wav/{k}.wav", text=s, duration=len(wave) / 16000,
                                    chars=chars, **data.toy_tasks(s))) + "\n")
    return root


def base_args(t, out):
    return ["--llm", str(t / "llm"), "--encoder", str(t / "enc"), "--train", str(t / "m.jsonl"),
            "--valid", str(t / "m.jsonl"), "--out", str(out), "--batch-size", "3", "--device", "cpu",
            "--max-new-tokens", "3", "--aligner-layers", "1", "--layers", "1", "--heads", "2",
            "--log-every", "1"]


def test_main_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    ssr.main(base_args(tiny, out) + ["--aligner-steps", "2", "--steps", "3", "--stage2-steps", "2",
                                     "--text-mix", "0.5"])
    for stage in ("aligner", "stage1", "stage2"):
        assert os.path.isfile(out / stage / "latest")
    printed = capsys.readouterr().out
    assert "stage 2 text_loss" in printed and "CTC (no transcript)" in printed
    final = json.loads(printed.split("final: ")[-1].splitlines()[0])
    assert 0 <= final["acc_oracle"] <= 1 and "cos_greedy" in final and "text_loss" in final
    ssr.main(["--ckpt", str(out), "--infer", str(tiny / "wav" / "0.wav"), "--eval", str(tiny / "m.jsonl"),
              "--max-new-tokens", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "nearest-token readout" in printed and '"cos_forced"' in printed
    with pytest.raises(SystemExit) as e:                 # stage 2 without a stage-1 checkpoint
        ssr.main(base_args(tiny, tmp_path / "empty") + ["--stage", "2"])
    assert e.value.code == 2


def test_stage1_never_runs_llm_and_keeps_its_weights(tiny, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM, LlamaModel
    loaded = []
    real = common.load_llm

    def spy(*a, **k):
        loaded.append(real(*a, **k))
        return loaded[-1]

    def boom(*a, **k):
        raise AssertionError("stage 1 ran the LLM")

    monkeypatch.setattr(common, "load_llm", spy)
    monkeypatch.setattr(LlamaForCausalLM, "forward", boom)
    monkeypatch.setattr(LlamaModel, "forward", boom)
    ssr.main(base_args(tiny, tmp_path / "r") + ["--stage", "1", "--aligner", "oracle", "--steps", "3",
                                                "--lr", "1e-2"])
    fresh = LlamaForCausalLM.from_pretrained(tiny / "llm")
    got = loaded[0][0].state_dict()
    assert all(torch.equal(v, got[k]) for k, v in fresh.state_dict().items())
    ck = common.find_checkpoint(str(tmp_path / "r" / "stage1"))
    from safetensors.torch import load_file
    assert all(k.startswith(("proj.", "blocks.")) for k in load_file(os.path.join(ck, "trainable.safetensors")))
