"""Tests of the shared plumbing and of each method, on tiny models built from configs (CPU).

Run: python -m pytest -q test_all.py
"""
import array
import contextlib
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import unicodedata
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


# ============================================================================================
# Fixtures: tiny models saved to disk, loaded back through the user's --llm / --encoder path


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)

def tiny_llama(tok, hidden=32, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * hidden,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_whisper(d=32, layers=1, seed=0):
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(seed)
    cfg = WhisperConfig(num_mel_bins=80, d_model=d, encoder_layers=layers, encoder_attention_heads=2,
                        encoder_ffn_dim=2 * d, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=2 * d, max_source_positions=1500, max_target_positions=16,
                        vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return WhisperModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folders of a tiny Llama + word tokenizer, a tiny Whisper, and a tiny toy corpus."""
    from transformers import WhisperFeatureExtractor
    root = tmp_path_factory.mktemp("tiny")
    tok = common.default_tokenizer()
    llm = tiny_llama(tok)
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    w = tiny_whisper()
    w.save_pretrained(root / "enc")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "enc")
    tm, vm = data.toy_corpus(str(root / "corpus"), n_train=48, n_valid=8, seed=1)
    return dict(llm=str(root / "llm"), enc=str(root / "enc"), train=tm, valid=vm, root=root)


def cpu():
    return torch.device("cpu")


@contextlib.contextmanager
def saved_for_backward():
    """-> a list that fills with the element count of each tensor the autograd graph keeps for the
    backward (parameters count 0: they are kept anyway)."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(0 if isinstance(t, nn.Parameter) else t.numel()) or t, lambda t: t):
        yield sizes


def save_tiny_wav2vec2(path, layers=1):
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                 intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                 conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                 num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                                 do_stable_layer_norm=True)).save_pretrained(path)


def run_python(*args, torchrun=False, timeout=300):
    """`python ARGS` in a subprocess (torchrun: 2 gloo processes on a free port), one thread each."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    return subprocess.run([sys.executable, *launch, *map(str, args)], capture_output=True, text=True,
                          cwd=HERE, env=dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1"), timeout=timeout)


def watch_host_syncs(monkeypatch, steps=2):
    """The first `steps` training steps of each common.train call run under bench.HostSyncs:
    -> the list of (method, counter) it fills."""
    import bench
    found, train = [], common.train

    def watched_train(args, module, step_fn, *a, **kw):
        def step(batch):
            if sum(m == kw.get("method") for m, _ in found) >= steps:
                return step_fn(batch)
            with bench.HostSyncs(host=[batch["wave_lens"]]) as s:
                out = step_fn(batch)
            found.append((kw.get("method"), s))
            return out
        return train(args, module, step, *a, **kw)
    monkeypatch.setattr(common, "train", watched_train)
    return found


# ============================================================================================
# data.py

def test_no_valid_holds_out_the_last_tenth_of_train(tmp_path, capsys):
    """--train without --valid: validation never sees a clip that trains (the last 10%, 1 to 50)."""
    import soundfile as sf
    p = tmp_path / "m.jsonl"
    sf.write(tmp_path / "0.wav", np.zeros(1600, np.float32), 16000)
    for i in range(1, 1000):                        # (manifests() checks that the files exist, and
        os.link(tmp_path / "0.wav", tmp_path / f"{i}.wav")      # reads the validation clips' headers)
    for n, k in ((30, 3), (5, 1), (1000, 50)):
        p.write_text("".join(json.dumps(dict(audio=f"{i}.wav", text=f"t {i}")) + "\n" for i in range(n)))
        train, valid = common.manifests(common.Args(train=str(p)))
        assert (len(train), len(valid)) == (n - k, k) and not {t["audio"] for t in train} & {v["audio"] for v in valid}
        assert f"the last {k} utterance(s) of --train are held out" in capsys.readouterr().out
    p.write_text(json.dumps(dict(audio="0.wav", text="t")) + "\n")
    train, valid = common.manifests(common.Args(train=str(p)))
    assert train == valid and "validates too" in capsys.readouterr().out


def test_manifest_errors_name_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    for lines, error in (('{"audio": "a.wav", "text": "hi"}\n{"audio": "b.wav" "text": "x"}', r"m.jsonl:2: malformed JSON"),
                         ('{"audio": "a.wav"}', r"m.jsonl:1: missing field 'text'"),
                         ('{"audio": "a.wav", "text": "  "}', r"m.jsonl:1: empty transcript"),
                         ('{"audio": "a.wav", "text": "hi"}\n{"audio": "a.wav", "text": 42}',
                          r"m.jsonl:2: 'text' must be a string, not int"),
                         ('{"audio": null, "text": "hi"}', r"m.jsonl:1: 'audio' must be a string, not NoneType"),
                         ('{"audio": "a.wav", "text": "hi", "duration": "3.2s"}',
                          r"m.jsonl:1: 'duration' must be a number of seconds, not '3.2s'")):
        p.write_text(lines + "\n")
        with pytest.raises(data.DataError, match=error):
            data.read_manifest(str(p))
    with pytest.raises(data.DataError, match="manifest not found"):
        data.read_manifest(str(tmp_path / "nope.jsonl"))
    p.write_text(json.dumps(dict(audio="a.wav", text="hi", chars=None, duration=None, continuation=" ",
                                 translation="", content=None)) + "\n")
    assert set(data.read_manifest(str(p))[0]) == {"audio", "text", "where"}    # null, empty: as if absent


def test_audio_errors_and_resampling(tmp_path):
    import soundfile as sf
    with pytest.raises(data.DataError, match="audio file not found"):
        data.load_audio(str(tmp_path / "missing.wav"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEnot really audio")
    with pytest.raises(data.DataError, match="cannot read audio"):
        data.load_audio(str(bad))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(data.DataError, match="empty audio"):
        data.load_audio(str(tmp_path / "empty.wav"))
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "8k.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1).astype(np.float32), 8000)
    w = data.load_audio(str(tmp_path / "8k.wav"))                  # stereo 8 kHz -> mono 16 kHz
    assert w.dtype == torch.float32 and abs(len(w) - 16000) <= 1


def test_manifests_written_from_librispeech_common_voice_and_covost(tmp_path, capsys):
    """python data.py librispeech|tsv: every transcript line becomes a manifest line that
    read_manifest takes (audio relative to the manifest, duration from the header, LibriSpeech
    lower-cased, CoVoST's translation kept); a missing clip is named by its source line and
    nothing is written, or it is left out with --skip-bad."""
    import soundfile as sf
    rng = random.Random(0)
    ls = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    ls.mkdir(parents=True)
    lens = {}
    for uid, words in (("84-121123-0000", "GO DO YOU HEAR"), ("84-121123-0001", "BUT IN LESS THAN FIVE MINUTES")):
        wave, _ = data.synthesize(words.lower().replace("v", "f"), rng)
        sf.write(ls / f"{uid}.flac", wave, 16000)
        lens[words.lower()] = len(wave) / 16000
    (ls / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    out = tmp_path / "manifests" / "dev.jsonl"                 # (its folder is made)
    r = subprocess.run([sys.executable, "data.py", "librispeech", str(tmp_path / "LibriSpeech"), "--out", str(out)],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    seconds = sum(lens.values())                               # (a small set: seconds, not 0.00 h)
    assert r.returncode == 0 and r.stdout.strip() == f"{out}: 2 utterances, {seconds:.1f} s", r.stdout + r.stderr
    for bad, says in ((tmp_path / "manifests", "a directory (give the manifest's file name)"),
                      (out / "x.jsonl", "cannot write there (a file in its path)")):
        r2 = subprocess.run([sys.executable, "data.py", "librispeech", str(tmp_path / "LibriSpeech"), "--out",
                             str(bad)], capture_output=True, text=True, cwd=HERE, timeout=120)
        assert r2.returncode == 2 and r2.stderr.strip() == f"error: --out {bad}: {says}", r2.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["audio"] == "../LibriSpeech/dev-clean/84/121123/84-121123-0000.flac"
    items = data.read_manifest(str(out))
    assert [it["text"] for it in items] == ["go do you hear", "but in less than five minutes"]
    for it in items:
        assert it["duration"] == pytest.approx(lens[it["text"]], abs=1e-3)
        assert len(data.load_audio(it["audio"])) == round(lens[it["text"]] * 16000)

    cv = tmp_path / "cv"
    (cv / "clips").mkdir(parents=True)
    sf.write(cv / "clips" / "a.mp3", np.zeros(4800, np.float32), 48000, format="MP3")   # Common Voice's
    sf.write(cv / "clips" / "b.wav", np.zeros(1600, np.float32), 16000)
    (cv / "train.tsv").write_text('client_id\tpath\tsentence\tup_votes\nx\ta.mp3\tHe said "yes".\t2\n'
                                  'y\tb.wav\tNo.\t1\nz\tgone.wav\tLost.\t0\n')
    with pytest.raises(SystemExit) as e:
        data.main(["tsv", str(cv / "train.tsv"), "--out", str(cv / "m.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"train.tsv:4: audio file not found: {cv / 'clips' / 'gone.wav'}" in err[0]
    assert not list(cv.glob("m.jsonl*"))                                   # nothing written
    data.main(["tsv", str(cv / "train.tsv"), "--out", str(cv / "m.jsonl"), "--skip-bad"])
    assert "train.tsv:4" in capsys.readouterr().err
    assert [(it["text"], it["duration"]) for it in data.read_manifest(str(cv / "m.jsonl"))] == \
        [('He said "yes".', 0.1), ("No.", 0.1)]
    assert len(data.load_audio(str(cv / "clips" / "a.mp3"))) == 1600                      # (48 kHz MP3)
    (tmp_path / "covost.tsv").write_text("\ufeffpath\tsentence\ttranslation\tclient_id\na.mp3\tHello.\tHallo.\tx\n")
    data.main(["tsv", str(tmp_path / "covost.tsv"), "--clips", str(cv / "clips"), "--out", str(tmp_path / "st.jsonl")])
    (it,) = data.read_manifest(str(tmp_path / "st.jsonl"))
    assert (it["text"], it["translation"], it["audio"]) == ("Hello.", "Hallo.", str(cv / "clips" / "a.mp3"))
    with pytest.raises(SystemExit):
        data.main(["librispeech", str(cv), "--out", str(tmp_path / "x.jsonl")])
    assert "no *.trans.txt below it" in capsys.readouterr().err
    (tmp_path / "short.tsv").write_text("path\tsentence\na.mp3\tHello.\n\tHi.\n")     # (an empty path)
    with pytest.raises(SystemExit):
        data.main(["tsv", str(tmp_path / "short.tsv"), "--clips", str(cv / "clips"), "--out", str(tmp_path / "y.jsonl")])
    assert "short.tsv:3: its 'path' is empty" in capsys.readouterr().err


def test_skip_bad_items(tmp_path, tiny):
    items = data.read_manifest(tiny["valid"])[:3]
    items[1] = dict(items[1], audio=str(tmp_path / "gone.wav"))
    ds = data.SpeechDataset(items, skip_bad=True)
    batch = data.collate([ds[i] for i in range(3)])
    assert len(batch["text"]) == 2
    with pytest.raises(data.DataError):
        data.SpeechDataset(items)[1]


def test_manifest_text_and_field_types_are_checked(tmp_path):
    """Non-UTF-8 bytes name their line; a BOM is read; optional fields of the wrong type stop at
    reading (they crashed deep inside the scripts)."""
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"audio": "a.wav", "text": "hi"}\n{"audio": "a.wav", "text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"m.jsonl:2: not UTF-8 text \(byte 0xe9"):
        data.read_manifest(str(p))
    p.write_bytes(b'\xef\xbb\xbf{"audio": "a.wav", "text": "hi"}\n')
    assert data.read_manifest(str(p))[0]["text"] == "hi"
    for row, error in ((dict(translation=3), "'translation' must be a string, not int"),
                       (dict(chars=["a", "b"]), "'chars' must be a list of \\[character, start_s, end_s\\]"),
                       (dict(chars=[["a", 0, "1"]]), "'chars' must be a list")):
        p.write_text(json.dumps(dict(audio="a.wav", text="ab", **row)) + "\n")
        with pytest.raises(data.DataError, match="m.jsonl:1: " + error):
            data.read_manifest(str(p))
    p.write_text(json.dumps(dict(audio="a.wav", text="ab", translation=None, chars=[["a", 0, 0.1]])) + "\n")
    assert len(data.read_manifest(str(p))) == 1


def test_unusable_audio_stops_the_run_before_it_trains(tmp_path, capsys):
    """common.manifests: a missing file, a directory, or a clip longer than the encoder's window
    is named (file:line) before any model trains; --skip-bad drops each with a line on stderr.
    Clips under 50 ms are refused when read."""
    import soundfile as sf
    sf.write(tmp_path / "ok.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    sf.write(tmp_path / "tiny.wav", np.zeros(10, np.float32), 16000)
    (tmp_path / "dir.wav").mkdir()
    p = tmp_path / "m.jsonl"
    rows = [dict(audio="ok.wav", text="a"), dict(audio="gone.wav", text="b"), dict(audio="dir.wav", text="c"),
            dict(audio="long.wav", text="d")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    window = types.SimpleNamespace(max_samples=lambda: 2 * 16000)        # a 2 s encoder
    args = common.Args(train=str(p), valid=str(p))
    with pytest.raises(data.DataError, match=r"m.jsonl:2: audio file not found: .*gone.wav \(--skip-bad"):
        common.manifests(args, window)
    args.skip_bad = True
    train, valid = common.manifests(args, window)
    assert [it["text"] for it in train] == ["a"] == [it["text"] for it in valid]
    err = capsys.readouterr().err
    assert "m.jsonl:3: a directory, not an audio file" in err
    assert "m.jsonl:4: a clip of 3.00 s is longer than the encoder's 2 s window" in err
    assert [it["text"] for it in common.manifests(args)[0]] == ["a", "d"]     # (no encoder: no window)
    q = tmp_path / "q.jsonl"                 # --max-seconds: no clip a batch alone past it
    q.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[3]]))
    with pytest.raises(data.DataError, match=r"q.jsonl:2: a clip of 3.00 s is longer than --max-seconds 2.5"):
        common.manifests(common.Args(train=str(q), valid=str(q), max_seconds=2.5))
    assert train[0]["duration"] == 1.0                                      # read from the header, once
    with pytest.raises(data.DataError, match="too short"):
        data.load_audio(str(tmp_path / "tiny.wav"))
    p.write_text(json.dumps(dict(audio="tiny.wav", text="e")) + "\n")
    v = tmp_path / "v.jsonl"                # --max-valid: the lines after the kept ones are not read
    v.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[0], rows[1]]))
    args = common.Args(train=str(p), valid=str(v), max_valid=2)
    with pytest.raises(data.DataError, match=r"m.jsonl:1: a clip of 1 ms: too short"):
        common.manifests(args)
    p.write_text(json.dumps(rows[0]) + "\n")
    assert len(common.manifests(args)[1]) == 2


def test_torchrun_processes_share_the_manifest_checks(tmp_path):
    """Under torchrun each audio file of the training manifest is checked by one process, not by
    every one (millions of lines on a network file system), and all keep the same items: a missing
    file dropped (--skip-bad), a duration the manifest lacks read from the header and shared."""
    import soundfile as sf
    for k in range(8):
        sf.write(tmp_path / f"{k}.wav", np.zeros(8000 + 1000 * k, np.float32), 16000)
    rows = [dict(audio=f"{k}.wav", text="a", **({} if k == 3 else {"duration": 0.5 + k / 16})) for k in range(8)]
    rows[5]["audio"] = "gone.wav"
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "check.py"
    script.write_text(f"""
import json, sys, common, data
device, rank, world = common.setup(common.Args(device="cpu"))
looked, missing_audio = [], data.missing_audio
data.missing_audio = lambda path: looked.append(path) or missing_audio(path)
items = data.read_manifest({str(tmp_path / "m.jsonl")!r})
kept = common.usable_items(items, common.Args(skip_bad=True))
json.dump(dict(kept=[(it["where"], it["duration"]) for it in kept], looked=len(looked)),
          open({str(tmp_path)!r} + f"/out{{rank}}.json", "w"))
""")
    r = run_python(script, torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads((tmp_path / f"out{rank}.json").read_text()) for rank in (0, 1)]
    assert out[0]["kept"] == out[1]["kept"] and len(out[0]["kept"]) == 7
    assert dict(out[0]["kept"])[f"{tmp_path / 'm.jsonl'}:4"] == 0.6875           # from the header
    assert [o["looked"] for o in out] == [4, 4]                                  # (8 each before)
    assert r.stderr.count("gone.wav") == 1                                       # said once


def test_a_clip_longer_than_its_manifest_says_is_caught_as_it_is_loaded(tmp_path, capsys):
    """A manifest's duration may understate a clip (1 s said, 3 s long): usable_items lets it by, so
    the loaders check each clip against the encoder's window as they load it, named (file:line), or
    left out with --skip-bad (it stopped deep in the encoder, naming no file, --skip-bad or not). A
    duration of 0 (some tools' "unknown") is read from the file's header."""
    import soundfile as sf
    sf.write(tmp_path / "ok.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [dict(audio="ok.wav", text="a", duration=1.0),
                                                         dict(audio="long.wav", text="b", duration=1.0),
                                                         dict(audio="long.wav", text="c", duration=0)]))
    window = types.SimpleNamespace(max_samples=lambda: 2 * 16000)        # a 2 s encoder
    args = common.Args(train=str(p), valid=str(p), skip_bad=True)
    train, _ = common.manifests(args, window)
    assert [it["text"] for it in train] == ["a", "b"]                    # c: its header says 3 s
    assert "m.jsonl:3: a clip of 3.00 s is longer than the encoder's 2 s window" in capsys.readouterr().err
    assert [b["text"] for b in common.batches(train, args)] == [["a"]]
    assert "skipping bad item: m.jsonl:2: a clip of 3.00 s is longer" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    args.skip_bad = False
    with pytest.raises(data.DataError, match=r"m.jsonl:2: a clip of 3.00 s is longer than the encoder's 2 s window"):
        list(common.batches(train, args))
    a = toy_args(tmp_path / "run", steps=2, batch_size=2)
    common.usable_items(train, a, window)                               # (the training loop's loader too)
    m = Toy()
    with pytest.raises(data.DataError, match=r"m.jsonl:2: a clip of 3.00 s is longer"):
        common.train(a, m, toy_step(m), train, cpu(), method="toy")


def test_a_validation_clip_its_manifest_misstates_is_found_before_training(tmp_path, capsys):
    """The validation (and --eval) manifest's files are looked at, whatever durations it says (up to
    --max-valid: few): a clip longer than said and past the encoder's window, or a file that is no
    audio, is named before training (it stopped the run after training, or with --skip-bad left an
    empty validation that crashed). An evaluation set --skip-bad empties at load time is one line."""
    import soundfile as sf
    sf.write(tmp_path / "ok.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 100)
    (tmp_path / "t.jsonl").write_text(json.dumps(dict(audio="ok.wav", text="a", duration=1.0)) + "\n")
    rows = [dict(audio="ok.wav", text="a", duration=1.0), dict(audio="long.wav", text="b", duration=1.0),
            dict(audio="junk.wav", text="c", duration=1.0)]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    window = types.SimpleNamespace(max_samples=lambda: 2 * 16000)        # a 2 s encoder
    args = common.Args(train=str(tmp_path / "t.jsonl"), valid=str(tmp_path / "v.jsonl"))
    with pytest.raises(data.DataError, match=r"v.jsonl:2: a clip of 3.00 s is longer than the encoder's 2 s"):
        common.manifests(args, window)
    args.skip_bad = True
    train, valid = common.manifests(args, window)
    err = capsys.readouterr().err
    assert [it["text"] for it in valid] == ["a"] and "v.jsonl:3: " in err and "cannot read audio" in err, err
    assert len(common.manifests(args, window, )[0]) == 1                  # (training lines: as said)
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(data.DataError, match=r"w.jsonl: no usable utterance to validate \(or --eval\) on"):
        common.manifests(dataclasses.replace(args, valid=str(tmp_path / "w.jsonl")), window)
    gone = [dict(valid[0], audio=str(tmp_path / "junk.wav"))]            # (unreadable since it was checked)
    with pytest.raises(data.DataError, match=r"v.jsonl: no clip of the evaluation set could be read"):
        list(common.batches(gone, args))


def test_an_epoch_of_nothing_but_bad_audio_stops_with_skip_bad(tmp_path):
    """--skip-bad where every clip fails to load (files gone mid-run, a mount lost): the loop went
    round the epochs for ever, printing; it stops with one line."""
    for k in range(4):
        (tmp_path / f"{k}.wav").write_bytes(b"not audio")
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(dict(audio=f"{k}.wav", text="a", duration=1.0)) + "\n" for k in range(4)))
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
m = Toy()
common.guard(lambda argv=None: common.train(toy_args({str(tmp_path / "run")!r}, skip_bad=True, steps=3), m, toy_step(m),
                                  data.read_manifest({str(p)!r}), common.setup(toy_args("x"))[0], method="toy"))()
""")
    r = run_python(script, timeout=60)
    assert r.returncode == 2 and "epoch 1: every batch was bad audio" in r.stderr, r.stderr[-2000:]


def test_a_whisper_encoders_window_is_the_longest_clip_it_takes(tiny):
    enc = common.load_encoder(tiny["enc"], cpu())
    n = enc.max_samples()
    with torch.no_grad():
        assert enc(torch.zeros(1, n), torch.tensor([n]))[0].shape[1] == enc.model.embed_positions.weight.shape[0]
        with pytest.raises(data.DataError, match="longer than the encoder's"):
            enc(torch.zeros(1, n + 1), torch.tensor([n + 1]))


def test_bad_audio_in_a_loader_worker_is_one_line_and_durations_are_checked(tmp_path, tiny, capsys):
    items = data.read_manifest(tiny["valid"])[:4]
    items[2] = dict(items[2], audio=str(tmp_path / "gone.wav"))
    loader, _ = data.make_loader(items, 8, shuffle=False, workers=1)
    with pytest.raises(data.DataError) as e:
        list(loader)
    assert str(e.value) == f"{items[2]['where']}: audio file not found: {tmp_path / 'gone.wav'}"
    assert data.first_loadable(items[2:])[0] is items[3]                      # (show_sample's clip)
    ds = data.SpeechDataset([dict(it, duration=it["duration"] * 3) for it in items[:2]])
    ds[0], ds[1]
    assert capsys.readouterr().err.count("batches (and --max-seconds) go by the manifest's durations") == 1


def test_given_tells_flags_on_the_command_line_from_defaults():
    """common.given: a flag given with its default value counts as given (BLSP-KD's --init and
    SLM's --ckpt take only the others from the run); abbreviations and --no-X count too."""
    a = common.parse_args(common.Args, ["--max-va", "200", "--no-skip-bad", "--seed=0"])
    assert [k for k in ("max_valid", "skip_bad", "seed", "steps", "lr") if common.given(a, k)] == \
        ["max_valid", "skip_bad", "seed"]
    assert not common.given(common.Args(), "seed")


def test_infer_and_eval_inputs_are_checked_before_models_load(tiny, tmp_path, capsys):
    """--ckpt alone, --infer / --eval without --ckpt or naming no file: one line, at parsing. An
    audio file given as a manifest says so; a clip too long for the encoder names --infer; --eval
    says when --max-valid leaves utterances out."""
    import soundfile as sf
    wav = data.read_manifest(tiny["valid"])[0]["audio"]
    for argv, msg in ((["--ckpt", str(tmp_path)], "add --infer WAV or --eval MANIFEST"),
                      (["--infer", wav], "--infer needs --ckpt RUN_DIR"),
                      (["--ckpt", str(tmp_path), "--eval", str(tmp_path / "m.jsonl")], "m.jsonl: no such file"),
                      (["--ckpt", str(tmp_path), "--infer", str(tmp_path)], "a directory")):
        with pytest.raises(common.UserError, match=re.escape(msg)):
            common.parse_args(common.Args, argv)
    with pytest.raises(data.DataError, match="an audio file, not a manifest"):
        data.read_manifest(wav)
    enc = common.load_encoder(tiny["enc"], cpu())
    sf.write(tmp_path / "long.wav", np.zeros(enc.max_samples() + 1, np.float32), 16000)
    with pytest.raises(data.DataError, match=r"^--infer .*long.wav: a clip of .* longer than the encoder's"):
        common.infer_batch(common.Args(infer=str(tmp_path / "long.wav")), enc, cpu())
    assert common.infer_batch(common.Args(infer=wav), enc, cpu())["wave"].shape[0] == 1
    assert len(common.eval_items(common.Args(eval=tiny["valid"], max_valid=3), enc)) == 3
    assert "--eval: the first 3 of 8 utterances (--max-valid 3)" in capsys.readouterr().err


def test_bucket_sampler_deterministic_sharded_low_padding():
    rng = random.Random(0)
    durs = [rng.uniform(2, 20) for _ in range(3000)]               # a LibriSpeech-like spread
    s = data.BucketBatchSampler(durs, 16, seed=3)
    assert s.batches() == data.BucketBatchSampler(durs, 16, seed=3).batches()
    s.set_epoch(1)
    assert s.batches() != data.BucketBatchSampler(durs, 16, seed=3).batches()
    assert s.padding_fraction() < 0.10
    r0 = data.BucketBatchSampler(durs, 16, seed=3, rank=0, world=2).batches()
    r1 = data.BucketBatchSampler(durs, 16, seed=3, rank=1, world=2).batches()
    assert len(r0) == len(r1) and not set(map(tuple, r0)) & set(map(tuple, r1))
    capped = data.BucketBatchSampler(durs, 64, max_seconds=100, seed=0).batches()
    assert all(max(durs[i] for i in b) * len(b) <= 100 or len(b) == 1 for b in capped)
    s = data.BucketBatchSampler(durs, 16, seed=3)
    s.set_epoch(0, start=5)
    assert list(s) == s.batches()[5:]
    one = [data.BucketBatchSampler(durs[:10], 16, rank=r, world=2).batches() for r in (0, 1)]
    assert one == [[], []]      # one batch, two processes: none for either (one waited forever)
    # an epoch on one process: every utterance once (the last, short batch too); batches full but
    # the last of each pool of 50 batches; never over --batch-size
    for n, bs, cap in ((3000, 16, None), (1001, 16, None), (1001, 64, 100)):
        b = data.BucketBatchSampler(durs[:n], bs, max_seconds=cap, seed=1).batches()
        assert sorted(i for x in b for i in x) == list(range(n))
        assert max(map(len, b)) <= bs
        if cap is None:
            assert sum(len(x) < bs for x in b) <= math.ceil(n / (bs * 50)) and max(map(len, b)) == bs
    two = [data.BucketBatchSampler(durs, 16, seed=3, rank=r, world=2).batches() for r in (0, 1)]
    assert len({i for r in two for x in r for i in x}) == 3000      # 188 batches, each on one process
    # steps of 4 batches (--grad-accum): one process keeps every batch (a short last step), two
    # processes as many each; 3 batches still make a run of steps of 4
    assert sum(map(len, data.BucketBatchSampler(durs[:1001], 16, seed=1, step=4).batches())) == 1001
    assert [len(data.BucketBatchSampler(durs[:1001], 16, rank=r, world=2, step=4).batches()) for r in (0, 1)] == [31, 31]
    assert len(data.BucketBatchSampler(durs[:40], 16, step=4).batches()) == 3
    for n, a in ((1001, 1), (1001, 2), (1024, 2)):   # 2 processes = 1 with twice the accumulation,
        one = data.BucketBatchSampler(durs[:n], 16, seed=2, step=2 * a).batches()    # step by step
        two = [data.BucketBatchSampler(durs[:n], 16, seed=2, rank=r, world=2, step=2 * a).batches() for r in (0, 1)]
        steps = lambda bs, k: [sorted(map(tuple, bs[i:i + k])) for i in range(0, len(bs) - k + 1, k)]
        assert [sorted(x + y) for x, y in zip(steps(two[0], a), steps(two[1], a))] == steps(one, 2 * a)[:len(two[0]) // a]


def test_bucket_sampler_gives_the_processes_of_a_step_similar_lengths():
    """Under torchrun a step waits for its slowest process: the w batches of a step are
    neighbours in one sorted pool. Busy share of a step (each process's padded audio over the
    step's largest), 8 processes, clips of 1-24 s; batches shuffled alone: 0.59."""
    rng = random.Random(0)
    durs = [rng.uniform(1, 24) for _ in range(20000)]
    ranks = [data.BucketBatchSampler(durs, 16, seed=1, rank=r, world=8).batches() for r in range(8)]
    cost = lambda b: max(durs[i] for i in b) * len(b)
    busy = [sum(map(cost, step)) / (8 * max(map(cost, step))) for step in zip(*ranks)]
    assert sum(busy) / len(busy) > 0.95                                  # (0.97 measured)
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) > 19000 and len({len(r) for r in ranks}) == 1
    assert len({round(cost(b)) for b in ranks[0]}) > 10        # the steps themselves still vary


def test_toy_corpus_boundaries_and_tasks(tiny):
    items = data.read_manifest(tiny["train"])
    it = items[0]
    assert "".join(c for c, _, _ in it["chars"]) == it["text"].replace(" ", "")
    starts = [s for _, s, _ in it["chars"]]
    assert starts == sorted(starts) and it["chars"][-1][2] < it["duration"]
    t = data.toy_tasks("the old fox sees the cat")
    assert t["continuation"] == "then the cat sees the fox again"
    assert [t["continuation"][s:e] for s, e in t["content"]] == ["cat", "sees", "fox"]
    assert len(t["translation"].split()) == 6


def test_whisper_log_mel_matches_hf():
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000, 23456)]
    wave = torch.zeros(2, 23456)
    for i, c in enumerate(clips):
        wave[i, :len(c)] = torch.from_numpy(c)
    ours, lens = data.whisper_log_mel(wave, torch.tensor([16000, 23456]), torch.tensor(fe.mel_filters))
    for i, c in enumerate(clips):
        ref = fe(c, sampling_rate=16000, return_tensors="np").input_features[0]
        n = int(lens[i])
        assert n == len(c) // 160
        # HF takes the max-8 clamp over 30 s (its padding frames are lower here): same real frames
        np.testing.assert_allclose(ours[i, :, :n].numpy(), ref[:, :n], atol=2e-4)
    thirty = rng.normal(0, 0.1, 480000).astype(np.float32)      # 30 s: HF's STFT reflects its end
    ours, lens = data.whisper_log_mel(torch.from_numpy(thirty)[None], torch.tensor([480000]),
                                      torch.tensor(fe.mel_filters))
    ref = fe(thirty, sampling_rate=16000, return_tensors="np").input_features[0]
    assert int(lens[0]) == 3000 and np.abs(ours[0].numpy() - ref).max() < 2e-4   # the last frame too


def test_kaldi_fbank_matches_seamless_extractor():
    from transformers import SeamlessM4TFeatureExtractor
    fe = SeamlessM4TFeatureExtractor()
    rng = np.random.default_rng(1)
    clip = rng.normal(0, 0.1, 12345).astype(np.float32)
    ref = fe(clip, sampling_rate=16000, return_tensors="np", padding=False).input_features[0]
    ours, lens = data.kaldi_fbank(torch.from_numpy(clip)[None], torch.tensor([len(clip)]))
    assert ours.shape[1] == ref.shape[0] == int(lens[0])
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=2e-3, rtol=1e-3)


# ============================================================================================
# The encoder: real length, never 30 s

def test_whisper_real_length_equals_hf_at_30s_and_is_batch_invariant(tiny):
    enc = common.load_encoder(tiny["enc"], cpu())
    feats = torch.randn(1, 80, 3000)
    hf = enc.model(feats).last_hidden_state                        # HF's own 30 s path
    ours, lens = enc.whisper_forward(feats, torch.tensor([3000]))
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-4)
    assert int(lens[0]) == 1500
    # real length: a clip's frames do not depend on the other clips of its batch
    w = torch.randn(2, 32000) * 0.1
    lens = torch.tensor([20000, 32000])
    batch, blens = enc(w, lens)
    alone, alens = enc(w[:1, :20000], lens[:1])
    assert batch.shape[1] == (200 - 1) // 2 + 1 and int(blens[0]) == int(alens[0]) == 63
    torch.testing.assert_close(batch[0, :63], alone[0], atol=1e-4, rtol=1e-3)


def test_whisper_30s_gives_the_released_codes_frames(tiny, tmp_path):
    """--whisper-30s runs Whisper as the released code does (HF's WhisperFeatureExtractor pads every
    clip to 30 s, all 1500 positions run): each clip's frames equal HF's, cropped to its own; at
    real length they differ (they do not attend to the silence after the clip). Only Whisper."""
    from transformers import WhisperFeatureExtractor
    torch.manual_seed(0)
    enc = common.load_encoder(tiny["enc"], cpu(), pad_30s=True)
    fe = WhisperFeatureExtractor.from_pretrained(tiny["enc"])
    lens = torch.tensor([16000, 40000])
    wave = torch.randn(2, 40000) * 0.1 * (torch.arange(40000)[None] < lens[:, None])
    frames, flens = enc(wave, lens)
    assert flens.tolist() == [50, 125] and frames.shape[1] == 125 and enc.frames == 175
    for i in range(2):
        feats = fe(wave[i, :lens[i]].numpy(), sampling_rate=16000, return_tensors="pt").input_features
        hf = enc.model(feats).last_hidden_state[0, :flens[i]]
        torch.testing.assert_close(frames[i, :flens[i]], hf, atol=1e-4, rtol=1e-3)
    real, _ = common.load_encoder(tiny["enc"], cpu())(wave, lens)
    assert (real[0, :50] - frames[0, :50]).abs().max() > 1e-2
    save_tiny_wav2vec2(tmp_path / "w2v", layers=1)
    with pytest.raises(common.UserError, match="--whisper-30s: .* is a wav2vec2 encoder, not Whisper"):
        common.load_encoder(str(tmp_path / "w2v"), cpu(), pad_30s=True)


def test_trained_encoder_under_grad_ckpt_recomputes_its_layers(tiny, tmp_path):
    """BLSP-KD --unfreeze-encoder --grad-ckpt: the encoder's layers keep their inputs only and run
    again in the backward; the same frames and gradients (Whisper through our own layer loop,
    wav2vec2 through transformers' forward)."""
    torch.manual_seed(0)
    save_tiny_wav2vec2(tmp_path / "w2v", layers=2)
    wave_lens = torch.tensor([16000, 9000])
    wave = torch.randn(2, 16000) * (torch.arange(16000)[None] < wave_lens[:, None])
    for path in (tiny["enc"], tmp_path / "w2v"):
        out = []
        for ckpt in (False, True):
            enc = common.load_encoder(str(path), cpu()).float()
            for p in enc.model.parameters():
                p.requires_grad_(True)
            if ckpt:
                common.enable_checkpointing(enc.model)
            with saved_for_backward() as saved:
                frames, _ = enc(wave, wave_lens)
            grads = torch.autograd.grad(frames.square().sum(), list(enc.model.parameters()), allow_unused=True)
            out.append((frames, grads, sum(saved)))            # (unused: wav2vec2's mask embedding)
        torch.testing.assert_close(out[1][0], out[0][0])
        assert sum(g is not None for g in out[1][1]) > 10
        for a, b in zip(out[1][1], out[0][1]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert out[1][2] < 0.8 * out[0][2], (path, out[1][2], out[0][2])


def test_encoder_frame_counts_on_the_host_equal_the_frames(tiny, tmp_path):
    """SpeechEncoder.output_lengths (on the host, from the clip lengths: what a step slices with)
    = the frame counts forward() gives = the frames of each clip encoded alone, for Whisper,
    wav2vec2 and w2v-BERT."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel
    torch.manual_seed(0)
    save_tiny_wav2vec2(tmp_path / "w2v")
    Wav2Vec2BertModel(Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, output_hidden_size=32,
                                         conv_depthwise_kernel_size=3)).save_pretrained(tmp_path / "bert")
    wave_lens = torch.tensor([16037, 9000, 24011, 1601])
    wave = torch.randn(4, 24011) * (torch.arange(24011)[None] < wave_lens[:, None])
    for path in (tiny["enc"], tmp_path / "w2v", tmp_path / "bert"):
        enc = common.load_encoder(str(path), cpu())
        with torch.no_grad():
            frames, lens = enc(wave, wave_lens)
            alone = [enc(wave[i:i + 1, :n], wave_lens[i:i + 1])[0].shape[1]
                     for i, n in enumerate(wave_lens.tolist())]
        host = enc.output_lengths(wave_lens)
        assert host.device.type == "cpu" and host.tolist() == lens.tolist() == alone, (enc.kind, host, alone)
        assert frames.shape[1] == max(alone)


def test_encoder_layer_is_numbered_as_hf_hidden_states(tmp_path):
    """--encoder-layer k gives HF's hidden_states[k] (a 3-layer Whisper: k = -4 .. 3); others are
    refused by name."""
    from transformers import WhisperFeatureExtractor
    tiny_whisper(layers=3).save_pretrained(tmp_path / "enc")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path / "enc")
    feats = torch.randn(1, 80, 3000)
    hf = common.load_encoder(str(tmp_path / "enc"), cpu()).model(feats, output_hidden_states=True).hidden_states
    assert len(hf) == 4
    for k in range(-4, 4):
        ours, _ = common.load_encoder(str(tmp_path / "enc"), cpu(), k).whisper_forward(feats, torch.tensor([3000]))
        torch.testing.assert_close(ours, hf[k], atol=1e-5, rtol=1e-4)
    for k in (4, -5):
        with pytest.raises(common.UserError, match=f"--encoder-layer {k}: .* has 3 layers"):
            common.load_encoder(str(tmp_path / "enc"), cpu(), k)

def test_encoder_and_llm_path_errors(tmp_path):
    with pytest.raises(common.UserError, match="--encoder: not a folder"):
        common.load_encoder(str(tmp_path / "none"), cpu())
    with pytest.raises(common.UserError, match="--llm: not a folder"):
        common.load_llm(str(tmp_path / "none"), cpu())
    (tmp_path / "junk").mkdir()
    with pytest.raises(common.UserError, match="cannot"):
        common.load_llm(str(tmp_path / "junk"), cpu())
    from transformers import WhisperConfig
    WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path / "whisper")
    with pytest.raises(common.UserError, match=r"an encoder-decoder model \(whisper\).*decoder-only"):
        common.load_llm(str(tmp_path / "whisper"), cpu())     # (AutoModelForCausalLM takes its decoder)
    with pytest.raises(common.UserError, match=r"--encoder .*junk: cannot read a model config \(\w+: .+\)"):
        common.load_encoder(str(tmp_path / "junk"), cpu())    # (why, as for --llm)
    tiny_llama(common.default_tokenizer()).save_pretrained(tmp_path / "causal")
    with pytest.raises(common.UserError, match=r"a decoder-only model \(llama\); SLM needs an encoder-decoder"):
        common.load_llm(str(tmp_path / "causal"), cpu(), kind="seq2seq")


def test_models_load_without_hub_kernels(tiny, tmp_path, monkeypatch):
    """transformers 5.25 kernelizes what from_pretrained loads unless told not to (on CUDA: layers
    fetched from the Hub at load and at each train()/eval(); offline, an error). Nothing we load
    may ask for it: the LLM, a Whisper and a wav2vec2 encoder."""
    import transformers.modeling_utils as mu
    asked = []
    real = mu.PreTrainedModel.set_use_kernels
    monkeypatch.setattr(mu.PreTrainedModel, "set_use_kernels", lambda self, use, *a, **kw: (
        asked.append(type(self).__name__) if use else None, real(self, False, *a, **kw))[1])
    save_tiny_wav2vec2(tmp_path / "w2v")
    llm, _ = common.load_llm(tiny["llm"], cpu())
    common.load_encoder(tiny["enc"], cpu()), common.load_encoder(str(tmp_path / "w2v"), cpu())
    llm.train(), llm.eval()
    assert asked == [] and not llm.use_kernels


# ============================================================================================
# Prompt, splice, LLM helpers, LoRA, generation

def test_alignment_eval_targets_end_and_text_input_as_in_training(tiny, monkeypatch):
    """Validation's continuation target ends with answer_end (what BLSP and BLSP-KD train on), not
    the smallest of the end ids; its text input is the normalised transcript (the continuations'
    source), as the teacher's."""
    import blsp
    llm, tok = common.load_llm(tiny["llm"], cpu())
    llm.generation_config.eos_token_id = [0, tok.eos_token_id]       # an end id below answer_end
    end = common.answer_end(llm, tok)
    assert end == tok.eos_token_id and common.eos_ids(llm, tok)[0] == 0
    items = data.read_manifest(tiny["valid"])[:2]
    for it in items:
        it["continuation"], it["text"] = "the cat sees", it["text"].upper() + "."
    seen, real = [], common.splice
    monkeypatch.setattr(common, "splice", lambda embed, samples, **kw: seen.append(samples) or real(embed, samples, **kw))
    d = llm.config.hidden_size
    common.alignment_eval(llm, tok, items, blsp.BLSPArgs(batch_size=2, max_new_tokens=2), cpu(),
                          lambda b: [torch.zeros(3, d) for _ in b["text"]], "continue")
    scored = [s for samples in seen for s in samples if len(s) == 4]
    assert len(scored) == 4 and all(s[3].ids[-1] == end for s in scored)
    assert sorted(s[1].ids for s in scored if s[1].ids is not None) == \
        sorted(common.input_ids(tok, common.normalize(it["text"])) for it in items)
    seen.clear()                    # BLSP-KD's continuation cut at --continuation-tokens: no end token,
    items[0]["continuation_ended"] = False                          # as it trains (it scored one)
    common.alignment_eval(llm, tok, items, blsp.BLSPArgs(batch_size=2, max_new_tokens=2), cpu(),
                          lambda b: [torch.zeros(3, d) for _ in b["text"]], "continue")
    scored = [s[3].ids for samples in seen for s in samples if len(s) == 4]
    assert sorted(x[-1] == end for x in scored) == [False, False, True, True]


def test_alignment_eval_with_partial_lora_updates_the_speech_only(tiny, monkeypatch):
    """BLSP-KD's validation with Partial LoRA: the speech positions get the LoRA update, in the
    teacher-forced passes and in the repeat's generation; the text input gets none (its loss is
    the frozen LLM's)."""
    import blsp
    llm, tok = common.load_llm(tiny["llm"], cpu())
    ctx, layers = common.add_lora(llm, r=4, masked=True)
    torch.manual_seed(0)
    for lora in layers:
        nn.init.normal_(lora.lora_B, std=0.5)
    items = data.read_manifest(tiny["valid"])[:2]
    for it in items:
        it["continuation"] = "the cat sees"
    gen, real = [], common.generate
    monkeypatch.setattr(common, "generate", lambda *a, **k: gen.append(k.get("lora")) or real(*a, **k))
    d, res = llm.config.hidden_size, {}
    for on in (True, False):
        ctx.enabled = on
        with torch.no_grad():
            res[on] = common.alignment_eval(llm, tok, items, blsp.BLSPArgs(batch_size=2, max_new_tokens=2),
                                            cpu(), lambda b: [torch.ones(3, d) for _ in b["text"]], "continue",
                                            lora=ctx)
    assert gen == [ctx, ctx] and ctx.rows is None
    assert res[True]["loss_text"] == pytest.approx(res[False]["loss_text"], rel=1e-6)
    assert abs(res[True]["loss_speech"] - res[False]["loss_speech"]) > 1e-3


def test_splice_text_equals_llm_on_token_ids(tiny):
    llm, tok = common.load_llm(tiny["llm"], cpu())
    b, a = common.prompt_pieces(tok, data.CONTINUE_INSTRUCTIONS[0])
    x = common.input_ids(tok, "the red fox sees the cat")
    y = common.target_ids(tok, "then the cat sees the fox again")
    ids = b + x + a + y
    ref = llm(input_ids=torch.tensor([ids])).logits
    short = [common.text(b), common.text(x[:2]), common.text(a)]
    sp = common.splice(llm.get_input_embeddings(), [
        [common.text(b), common.text(x), common.text(a), common.text(y, loss=True)], short])
    out = llm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
              position_ids=sp.position_ids).logits
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
    # labels: the target ids at the target positions, -100 everywhere else
    lab = sp.labels[0]
    s, e = sp.spans[0][3]
    assert lab[s:e].tolist() == y and (lab[:s] == -100).all() and (lab[e:] == -100).all()
    assert (sp.labels[1] == -100).all()
    n = len(b) + 2 + len(a)
    assert sp.attention_mask[1].tolist() == [1] * n + [0] * (len(ids) - n)
    assert sp.position_ids[1, :n].tolist() == list(range(n))
    # left padding (generation) packs at the end with the same positions
    sp = common.splice(llm.get_input_embeddings(), [short, short[:1]], pad_left=True)
    assert sp.attention_mask[1].tolist()[-len(b):] == [1] * len(b)
    assert sp.position_ids[1, -len(b):].tolist() == list(range(len(b)))


def test_splice_speech_positions_and_gradient():
    emb = nn.Embedding(10, 4)
    v = torch.randn(3, 4, requires_grad=True)
    sp = common.splice(emb, [[common.text([1, 2]), common.speech(v), common.text([3], loss=True)]])
    assert sp.speech_mask[0].tolist() == [False, False, True, True, True, False]
    torch.testing.assert_close(sp.inputs_embeds[0, 2:5], v)
    w = torch.randn(1, 4)                                  # flat rows b*T+t, left padding too
    for pad_left in (False, True):
        sp2 = common.splice(emb, [[common.text([1]), common.speech(w), common.text([2])],
                                  [common.speech(v), common.text([3, 4])]], pad_left)
        assert torch.equal(sp2.speech_rows, sp2.speech_mask.flatten().nonzero()[:, 0])
        assert sp2.speech_rows.tolist() == ([1, 5, 6, 7] if not pad_left else [3, 5, 6, 7])
    assert sp.labels[0].tolist() == [-100] * 5 + [3]
    sp.inputs_embeds.sum().backward()
    assert v.grad is not None and torch.equal(v.grad, torch.ones(3, 4))


def test_prompt_pieces_blsp_template(tiny):
    _, tok = common.load_llm(tiny["llm"], cpu())
    b, a = common.prompt_pieces(tok, data.REPEAT_INSTRUCTIONS[0], "blsp")
    assert tok.decode(b).startswith("<s> ###[Human]:") and tok.decode(a) == "###[Assistant]:"


def test_a_chat_template_that_writes_todays_date_gets_a_fixed_one(tiny):
    """Llama 3.x templates write today's date (strftime_now) when given no date_string: the prompt
    changed from one day to the next (training, resuming, inference). It is given one."""
    _, tok = common.load_llm(tiny["llm"], cpu())
    tok.chat_template = ("{% if date_string is defined %}the{% else %}{{ strftime_now('%d') }}{% endif %} "
                         "{{ messages[0]['content'] }}")
    b, _ = common.prompt_pieces(tok, "a", "chat")
    assert tok.decode(b).endswith("the a")


def test_answer_end_is_the_token_that_closes_the_assistant_turn(tiny):
    """Qwen2-Instruct and Llama-3-Instruct list several end tokens; the turn's own (<|im_end|>,
    <|eot_id|>) is not the smallest. A ChatML template here, with eos_ids = [</s>, <|im_end|>]."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    assert common.answer_end(llm, tok) == tok.eos_token_id        # the toy template has no turn end
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    llm.generation_config.eos_token_id = [tok.eos_token_id, im_end]
    assert common.eos_ids(llm, tok)[0] == tok.eos_token_id != im_end
    assert common.answer_end(llm, tok) == im_end
    assert common.answer_end(llm, tok, "blsp") == tok.eos_token_id

def test_a_base_checkpoint_with_a_chat_template_ends_answers_at_the_turn_end(tiny, tmp_path, monkeypatch):
    """A base checkpoint that ships a chat template (Qwen2.5 base): its EOS is <|endoftext|>, its
    template closes a turn with <|im_end|>, which no end id lists. Continuations end with
    <|im_end|>, and generation (the cached continuations, respond) stops there."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    llm.resize_token_embeddings(len(tok))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    llm.generation_config.eos_token_id = tok.eos_token_id
    assert im_end not in common.eos_ids(llm, tok)
    assert common.answer_end(llm, tok) == im_end
    assert common.eos_ids(llm, tok, "auto") == sorted([tok.eos_token_id, im_end])
    assert common.eos_ids(llm, tok, "blsp") == [tok.eos_token_id]
    stops = []
    monkeypatch.setattr(common, "generate", lambda llm, sp, eos, *a, **k: stops.append(eos) or [[]] * len(sp.spans))
    common.respond(llm, tok, [common.text([5, 6])], "repeat", "auto")
    args = types.SimpleNamespace(prompt="auto", gen_batch_size=2)
    common.cached_answers(llm, tok, "go on", ["a b"], args, 3, str(tmp_path), "train")
    assert stops == [[tok.eos_token_id, im_end]] * 2


def test_lm_loss_equals_direct_cross_entropy(tiny):
    """lm_loss on a right-padded splice (targets laid out on the host, no attention mask) = -log p
    of each target from the LLM run on each sample alone."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    a, b = torch.randint(4, len(tok), (9,)).tolist(), torch.randint(4, len(tok), (7,)).tolist()
    embed = llm.get_input_embeddings()
    sp = common.splice(embed, [[common.text(a[:5]), common.text(a[5:], loss=True)],
                               [common.text(b[:3]), common.text(b[3:6], loss=True), common.text(b[6:])]])
    rows, ids = sp.targets                       # = where the labels say, read the slow way
    assert rows.tolist() == F.pad(sp.labels[:, 1:] != -100, (0, 1)).flatten().nonzero()[:, 0].tolist()
    assert ids.tolist() == sp.labels[sp.labels != -100].tolist()
    loss, n = common.lm_loss(llm, common.hidden_states(llm, sp), sp)
    direct, count = 0.0, 0
    for x, (s, e) in ((a, (5, 9)), (b, (3, 6))):
        logits = llm(input_ids=torch.tensor([x])).logits[0]
        for t in range(s, e):
            direct, count = direct - logits[t - 1].log_softmax(-1)[x[t]], count + 1
    assert n == count == 7 and sp.n_tokens == 16
    torch.testing.assert_close(loss, direct, atol=1e-4, rtol=1e-5)
    # a target at position 0 has no position before it to predict it
    sp = common.splice(embed, [[common.text(a, loss=True)]])
    loss, n = common.lm_loss(llm, common.hidden_states(llm, sp), sp)
    logits = llm(input_ids=torch.tensor([a])).logits[0]
    assert n == 8
    torch.testing.assert_close(loss, -sum(logits[t - 1].log_softmax(-1)[a[t]] for t in range(1, 9)),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral", "Phi3", "Gemma3Text"])
def test_hidden_states_without_a_mask_equal_the_masked_ones_at_real_positions(arch):
    """hidden_states passes no attention mask (right padding: causal attention keeps the padding
    out of the real positions); at the real positions it equals transformers' own path with the
    (B, T) mask and positions, for several families, also with a sliding window shorter than the
    batch (Gemma 3's, 8 here). A left-padded batch is refused."""
    llm = tiny_causal_lm(arch)
    for lens in ((6, 3), (6, 6), (12, 5)):
        sp = common.splice(llm.get_input_embeddings(), [[common.text(list(range(3, 3 + n)))] for n in lens])
        with torch.no_grad():
            ours = common.hidden_states(llm, sp)
            theirs = llm.base_model(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                                    position_ids=sp.position_ids).last_hidden_state
        real = sp.attention_mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        common.hidden_states(llm, common.splice(llm.get_input_embeddings(), [[common.text([3])]], True))


@contextlib.contextmanager
def no_cache_deprecation():
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40):
    common passes and reads the KV cache by the name the installed version has (cache_arg, kv_cache)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        yield


def test_cache_keyword_follows_the_forward_signature():
    class New(nn.Module):
        def forward(self, x, cache=None, use_cache=False):
            return x

    class Old(nn.Module):
        def forward(self, x, past_key_values=None, use_cache=False):
            return x
    assert common.cache_arg(New(), 7) == {"cache": 7} and common.cache_arg(Old(), 7) == {"past_key_values": 7}
    assert common.kv_cache({"cache": 3}) == 3 and common.kv_cache(type("Out", (dict,), dict(past_key_values=4))()) == 4


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral", "Phi3", "Gemma3Text"])
def test_hidden_states_run_a_shared_prefix_once(arch):
    """A prefix that every sample shares (18 tokens, longer than Gemma 3's window of 8) runs once,
    for one sample: the hidden states at the real positions and the speech vectors' gradients
    equal those of the batch run whole, with (B - 1) x 18 fewer positions through the layers and
    no wait for the GPU; with --grad-ckpt too (the recompute reads the same prefix)."""
    import bench
    llm = common.freeze(tiny_causal_lm(arch))
    ckpt = common.freeze(tiny_causal_lm(arch))
    common.enable_checkpointing(ckpt)
    torch.manual_seed(1)
    vecs = [torch.randn(n, 32, requires_grad=True) for n in (5, 9, 3)]
    samples = [[text(range(3, 21)), speech(v), text([30, 31]), text([40 + i, 41, 42], loss=True)]
               for i, v in enumerate(vecs)]
    ran = []

    def count(module, args, kwargs):                      # positions the first layer runs
        x = args[0] if args else kwargs["hidden_states"]
        ran.append(x.shape[0] * x.shape[1])
    for m in (llm, ckpt):
        m.base_model.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    out = []
    for model, shared in ((llm, False), (llm, True), (ckpt, True)):
        sp = common.splice(model.get_input_embeddings(), samples)
        assert sp.prefix == 18
        sp.prefix = sp.prefix if shared else 0
        ran.clear()
        with bench.HostSyncs() as syncs, no_cache_deprecation():
            h = common.hidden_states(model, sp)
            loss, _ = common.lm_loss(model, h, sp)
        forward = sum(ran)
        out.append((h[sp.attention_mask.bool()], loss, torch.autograd.grad(loss, vecs), forward,
                    sp.llm_tokens, syncs.total()))
    h0, l0, g0, ran0, t0, _ = out[0]
    assert ran0 == 3 * 32 and t0 == 86
    for h, l, g, ran1, t1, waits in out[1:]:
        torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, l0, atol=1e-5, rtol=1e-6)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert ran1 == 18 + 3 * 14 and t1 == 86 - 2 * 18 and waits == 0


def test_shared_prefix_runs_once_under_partial_lora():
    """BLSP-KD stage 2's student pass: Partial LoRA updates the speech positions only, so the text
    prefix runs once as without LoRA, and the rest of the pass reads the mask from the prefix on:
    hidden states and the gradients of the speech vectors and of LoRA's weights equal those of the
    batch run whole, with --grad-ckpt too (the recompute reads the same part of the mask)."""
    torch.manual_seed(0)
    models = []
    for grad_ckpt in (False, True):
        llm = common.freeze(tiny_causal_lm("Llama"))
        if grad_ckpt:
            common.enable_checkpointing(llm)
        ctx, lora = common.add_lora(llm, dropout=0.0, masked=True)
        models.append((llm, ctx, [p for p in lora.parameters() if p.requires_grad]))
    for p, q in zip(models[0][2], models[1][2]):
        nn.init.normal_(p.data, std=0.2)                  # lora_B starts at zero: give it weight
        q.data.copy_(p.data)
    vecs = [torch.randn(n, 32, requires_grad=True) for n in (5, 9, 3)]
    samples = [[text(range(3, 21)), speech(v), text([30, 31]), text([40 + i, 41, 42], loss=True)]
               for i, v in enumerate(vecs)]
    out = []
    for (llm, ctx, lora), shared in ((models[0], False), (models[0], True), (models[1], True)):
        sp = common.splice(llm.get_input_embeddings(), samples)
        sp.prefix = sp.prefix if shared else 0
        ctx.rows = sp.speech_rows
        assert common.prefix_runs_once(llm, sp) == shared
        h = common.hidden_states(llm, sp)
        assert ctx.rows is sp.speech_rows                  # given back as it was
        ctx.rows = None                                    # as BLSP-KD's llm_pass leaves it
        loss, _ = common.lm_loss(llm, h, sp)
        out.append((h[sp.attention_mask.bool()], torch.autograd.grad(loss, vecs + lora),
                    sp.llm_tokens))
    h0, g0, t0 = out[0]
    assert t0 == 86 and all(g.abs().sum() > 0 for g in g0[:3 + 2 * 7])   # the vectors; layer 0's LoRA
    for h, g, t in out[1:]:
        torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert t == 86 - 2 * 18


def test_shared_prefix_found_and_run_once_only_where_exact():
    """splice finds the leading text that every sample shares (not a target, not speech, not
    left-padded; one position of the shortest sample left after it). hidden_states runs it once
    only from SHARED_PREFIX_MIN tokens, with a frozen LLM of attention layers only whose LoRA, if
    any, is off or masked to the speech."""
    emb, v = nn.Embedding(100, 8), torch.zeros(2, 8)

    def prefix(*samples, pad_left=False):
        return common.splice(emb, list(samples), pad_left).prefix
    assert prefix([text([1, 2, 3, 4]), speech(v)], [text([1, 2, 3, 5]), speech(v)]) == 3
    assert prefix([text([1, 2, 3]), speech(v)], [text([1, 2, 3, 4])]) == 3
    assert prefix([text([1, 2, 3])], [text([1, 2, 3])]) == 2
    assert prefix([text([1, 2, 3]), speech(v)], [text([1, 2, 3]), speech(v)], pad_left=True) == 0
    assert prefix([text([1, 2, 3], loss=True)], [text([1, 2, 3], loss=True)]) == 0
    assert prefix([speech(v), text([1, 2])], [speech(v), text([1, 2])]) == 0
    assert prefix([text([1, 2, 3]), speech(v)]) == 0
    assert prefix([text([2, 1]), speech(v)], [text([1, 1]), speech(v)]) == 0

    llm = common.freeze(tiny_causal_lm("Llama"))
    sp = common.splice(llm.get_input_embeddings(), [[text(range(3, 21)), text([30 + i])] for i in range(2)])
    assert sp.prefix == 18 and common.prefix_runs_once(llm, sp)
    sp.prefix = common.SHARED_PREFIX_MIN - 1
    assert not common.prefix_runs_once(llm, sp)
    sp.prefix = 18
    llm.lm_head.weight.requires_grad_(True)                # something of the LLM trains
    assert not common.prefix_runs_once(llm, sp)
    llm.lm_head.weight.requires_grad_(False)
    ctx, _ = common.add_lora(llm)
    common.freeze(llm)                                     # LoRA on every position, even frozen
    assert not common.prefix_runs_once(llm, sp)
    ctx.enabled = False                                    # LoRA off: the frozen LLM
    assert common.prefix_runs_once(llm, sp)
    hybrid = common.freeze(tiny_causal_lm("Qwen3Next"))   # linear attention keeps a recurrent state
    hsp = common.splice(hybrid.get_input_embeddings(), [[text(range(3, 21)), text([30 + i])] for i in range(2)])
    assert hsp.prefix == 18 and not common.prefix_runs_once(hybrid, hsp)
    assert common.hidden_states(hybrid, hsp).shape == (2, 19, 32)
    llm = common.freeze(tiny_causal_lm("Llama"))
    ctx, _ = common.add_lora(llm, masked=True)             # Partial LoRA: trained, masked
    assert common.prefix_runs_once(llm, sp)                # no mask: no update anywhere
    ctx.rows = sp.speech_rows                              # the speech only: the prefix is text
    assert common.prefix_runs_once(llm, sp)
    ctx.rows = torch.arange(2 * 19)                        # any other rows might reach the prefix
    assert not common.prefix_runs_once(llm, sp)


def tiny_causal_lm(arch):
    """A 2-layer model of one family (transformers' `{arch}Config`), SDPA; Gemma 3 with a sliding
    window of 8 positions."""
    import transformers
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, intermediate_size=64, pad_token_id=0, eos_token_id=1)
    kw.update({"head_dim": 16, "sliding_window": 8} if arch == "Gemma3Text" else {})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, arch + "Config")(**kw),
                                                         attn_implementation="sdpa").eval()


def test_per_row_loss_chunks_equal_one_pass_and_keep_no_logits(tiny):
    """The chunked, checkpointed loss = the same formula on all rows at once (values and
    gradients), and the backward keeps no (rows, V) logits: only the (rows, d) hidden states."""
    llm, _ = common.load_llm(tiny["llm"], cpu())
    head = llm.get_output_embeddings()
    K, V = 10, head.out_features
    h_t, h_s0 = torch.randn(K, head.in_features), torch.randn(K, head.in_features)
    y = torch.randint(0, V, (K,))

    def kl(t, s):                                          # KL(p_t || p_s) at T = 2, per row
        lt, ls = (t / 2).log_softmax(-1), (s / 2).log_softmax(-1)
        return (lt.exp() * (lt - ls)).sum(-1)

    def run(chunked):
        h_s = h_s0.clone().requires_grad_()
        with saved_for_backward() as saved:
            if chunked:                                    # 3 rows per chunk: 4 chunks
                k = common.per_row_loss(llm, kl, [h_t, h_s], chunk_elems=3 * V)
                ce = common.per_row_loss(llm, lambda s, y: F.cross_entropy(s, y, reduction="none"),
                                         [h_s], [y], chunk_elems=3 * V)
            else:
                k = kl(head(h_t).float(), head(h_s).float())
                ce = F.cross_entropy(head(h_s).float(), y, reduction="none")
        (k.sum() + ce.sum()).backward()
        return k.detach(), ce.detach(), h_s.grad, max(saved)
    k0, ce0, g0, m0 = run(False)
    k1, ce1, g1, m1 = run(True)
    assert k1.shape == (K,) and k0.min() > 0
    torch.testing.assert_close(k1, k0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ce1, ce0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)
    assert m0 >= K * V and m1 <= K * head.in_features         # the largest tensor kept for backward

def test_lora_masked_and_plain(tiny):
    llm, tok = common.load_llm(tiny["llm"], cpu())
    ids = torch.randint(4, len(tok), (2, 7))
    base = llm(input_ids=ids).logits
    ctx, layers = common.add_lora(llm, r=4, alpha=8, dropout=0.0, masked=True)
    assert len(layers) == 2 * 7                                      # q k v o gate up down per block
    for l in layers:
        nn.init.normal_(l.lora_B)                                   # a non-trivial update
    ctx.rows = torch.zeros(0, dtype=torch.long)
    assert torch.equal(llm(input_ids=ids).logits, base)             # mask 0: exactly the base model
    m = torch.zeros(2, 7)
    m[:, 3:5] = 1
    ctx.rows = m.flatten().nonzero()[:, 0]                          # rows 3, 4, 10, 11
    out = llm(input_ids=ids).logits
    assert torch.equal(out[:, :3], base[:, :3]) and not torch.allclose(out[:, 3:], base[:, 3:])
    one = layers[0]                                                 # the paper's form, by hand:
    x = torch.randn(2, 7, one.base.in_features)
    slow = one.base(x) + m[..., None] * (x @ one.lora_A.T @ one.lora_B.T) * (8 / 4)   # Wx + m BAx a/r
    torch.testing.assert_close(one(x), slow)
    ctx.enabled = False
    assert torch.equal(llm(input_ids=ids).logits, base)             # teacher: LoRA off
    ctx.enabled, ctx.masked = True, False                           # plain LoRA everywhere
    assert not torch.allclose(llm(input_ids=ids).logits[:, 0], base[:, 0])


def test_precision_bf16_on_cpu_loss_and_lora_gradients_match_fp32(tiny, monkeypatch):
    """--precision bf16 on a CPU: frozen LLM in bf16, trained LoRA in fp32 under bf16 autocast;
    the loss and the LoRA gradients agree with the fp32 path to bf16 precision."""
    out = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setattr(common, "BF16", None)
        common.set_precision(precision, cpu())
        assert common.frozen_dtype(cpu()) == (torch.bfloat16 if precision == "bf16" else torch.float32)
        llm, tok = common.load_llm(tiny["llm"], cpu())
        assert llm.get_input_embeddings().weight.dtype == common.frozen_dtype(cpu())
        torch.manual_seed(0)
        _, layers = common.add_lora(llm, r=4, alpha=8, dropout=0.0)
        for l in layers:
            nn.init.normal_(l.lora_B, std=0.1)
        ids = torch.randint(4, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
        sp = common.splice(llm.get_input_embeddings(), [[common.text(x, loss=True)] for x in ids.tolist()])
        with common.autocast(cpu()):
            loss, n = common.lm_loss(llm, common.hidden_states(llm, sp), sp)
        loss.backward()
        assert all(l.lora_A.dtype == torch.float32 and l.lora_A.grad.dtype == torch.float32 for l in layers)
        out[precision] = loss.item(), torch.cat([l.lora_A.grad.flatten() for l in layers])
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert l16 != l32                                              # bf16 really ran
    assert abs(l16 - l32) < 0.02 * abs(l32)
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)     # a CPU without bf16 instructions
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        common.set_precision("bf16", cpu())
    assert common.frozen_dtype(cpu()) == torch.bfloat16            # warned, not refused


def test_generate_batched_equals_one_at_a_time(tiny):
    llm, tok = common.load_llm(tiny["llm"], cpu())
    eos = common.eos_ids(llm, tok)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    emb = llm.get_input_embeddings()
    batched = common.generate(llm, common.splice(emb, [[common.text(p)] for p in prompts], True), eos, 6)
    for p, out in zip(prompts, batched):
        alone = common.generate(llm, common.splice(emb, [[common.text(p)]], True), eos, 6)[0]
        ref = llm.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                           eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        assert out == alone == ref


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral", "Phi3", "Gemma3Text"])
def test_generate_with_step_masks_equals_transformers_per_prompt(arch):
    """Left-padded batched greedy decoding, decode steps masked by step_mask ((B, 1, 1, K)
    booleans, or the (B, K) mask past Gemma 3's sliding window of 8) = transformers' generate on
    each prompt alone, for several families."""
    llm = tiny_causal_lm(arch)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    emb = llm.get_input_embeddings()
    with torch.no_grad():
        with no_cache_deprecation():
            batched = common.generate(llm, common.splice(emb, [[common.text(p)] for p in prompts], True), [1], 7)
        for p, out in zip(prompts, batched):
            ref = llm.generate(torch.tensor([p]), max_new_tokens=7, do_sample=False, eos_token_id=1,
                               pad_token_id=0)[0, len(p):].tolist()
            assert out == ref[:next((i for i, t in enumerate(ref) if t == 1), len(ref))], (arch, p)
    assert common.step_mask(llm, torch.ones(2, 8, dtype=torch.long)).shape == (2, 1, 1, 8)


def test_generate_texts_cache_resumes(tiny, tmp_path):
    llm, tok = common.load_llm(tiny["llm"], cpu())
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    cache = str(tmp_path / "gen.jsonl")
    full = common.generate_texts(llm, tok, prompts, 4, 2, cache)
    lines = read(cache).splitlines()
    write(cache, lines[0] + "\n" + lines[1][:5])          # an interrupted write
    assert common.generate_texts(llm, tok, prompts, 4, 2, cache) == full
    assert len(read(cache).splitlines()) >= 3
    assert len(common.read_texts(cache)) == 3        # the cut line ended: the next ones stay whole


def test_generate_texts_says_what_it_does_in_a_log_file(tiny, tmp_path, monkeypatch, capsys):
    """A long generation (the continuations of a corpus) is not silent where no progress bar
    shows (a cluster job's log): a line at its start and end, one at most every 30 s between;
    nothing when every answer is cached."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    clock = iter(range(0, 10000, 40))                       # 40 s a call of time.time()
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [5], [6, 7], [9]]
    common.generate_texts(llm, tok, prompts[:2], 4, 2, str(tmp_path / "gen.jsonl"), desc="answers (train)")
    capsys.readouterr()
    common.generate_texts(llm, tok, prompts, 4, 2, str(tmp_path / "gen.jsonl"), desc="answers (train)")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "answers (train): 4 of 6 to generate with the frozen LLM (2 cached in gen.jsonl)"
    assert re.fullmatch(r"answers \(train\): 2/4, [\d.]+ prompts/s, [\d.]+ min to go", out[1]), out
    assert re.fullmatch(r"answers \(train\): 4 generated in \d+ s", out[-1]) and len(out) == 3, out
    common.generate_texts(llm, tok, prompts, 4, 2, str(tmp_path / "gen.jsonl"), desc="answers (train)")
    assert capsys.readouterr().out == ""


def test_a_signal_while_generating_keeps_the_answers_and_says_so_in_one_line(tiny, tmp_path, monkeypatch,
                                                                            capsys):
    """Ctrl-C or SIGTERM (a cluster's preemption) while the frozen LLM writes a corpus's answers
    (hours at scale): one line naming what is kept and how to go on, exit 130 / 143, the answers
    written so far kept, SIGTERM's handler put back; the same call then generates only the rest."""
    import signal
    llm, tok = common.load_llm(tiny["llm"], cpu())
    prompts, cache = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [5]], str(tmp_path / "gen.jsonl")
    full = common.generate_texts(llm, tok, prompts, 4, 2, str(tmp_path / "full.jsonl"))
    generate, before = common.generate, signal.getsignal(signal.SIGTERM)
    for sig, code, name in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        if os.path.exists(cache):
            os.remove(cache)
        calls = []

        def stopped_in_batch_2(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), sig)
                time.sleep(1)                               # (the handler runs in the main thread)
            return generate(*a, **k)
        monkeypatch.setattr(common, "generate", stopped_in_batch_2)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            common.generate_texts(llm, tok, prompts, 4, 2, cache)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == code and len(err) == 1, err
        assert err[0] == f"interrupted ({name}) while the frozen LLM wrote its answers: 2 of 4 kept in {cache}; " \
                         f"the same command continues from there"
        assert len(common.read_texts(cache)) == 2 and signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(common, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    calls.clear()
    assert common.generate_texts(llm, tok, prompts, 4, 2, cache) == full and len(calls) == 1


def test_generate_runs_no_forward_past_the_limit(tiny, monkeypatch):
    """max_new_tokens forwards in all: the prompt's, then one per new token but the last."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    calls, forward = [], llm.forward
    monkeypatch.setattr(llm, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    sp = common.splice(llm.get_input_embeddings(), [[common.text([5, 6, 7])]], True)
    assert len(common.generate(llm, sp, [10 ** 6], 4)[0]) == 4 and len(calls) == 4


def test_cached_answers_key_changes_with_the_weights_and_dtype(tiny, tmp_path, monkeypatch):
    """The continuations cached in a run directory are not reused for other weights at the same
    path (a rebuilt model) or another precision: greedy answers differ. The same weights in
    another folder (a node's own disk) or with new file times are the same model: reused. A cache
    named by an earlier version's key (the folder and file times) is still read."""
    import blsp
    import shutil
    path, out = str(tmp_path / "llm"), str(tmp_path / "run")
    shutil.copytree(tiny["llm"], path)
    llm, tok = common.load_llm(path, cpu())
    args = blsp.BLSPArgs(llm=path, gen_batch_size=2)
    ask = lambda m: common.cached_answers(m, tok, "continue", ["the cat"], args, 2, out, "t")
    ask(llm)
    first = os.listdir(out)
    tokenized, input_ids = [], common.input_ids
    monkeypatch.setattr(common, "input_ids", lambda *a: tokenized.append(a) or input_ids(*a))
    ask(llm)
    assert os.listdir(out) == first and not tokenized         # the same: reused, no prompt tokenized
    monkeypatch.undo()
    ask(llm.to(torch.bfloat16))
    assert len(os.listdir(out)) == 2
    os.utime(glob.glob(os.path.join(path, "*.safetensors"))[0], (1, 1))     # new file times only
    shutil.copytree(path, tmp_path / "copy")                               # and a copy elsewhere
    ask(llm.float())
    ask(common.load_llm(str(tmp_path / "copy"), cpu())[0])
    assert len(os.listdir(out)) == 2
    before = set(os.listdir(out))
    rebuilt = common.load_llm(path, cpu())[0]                              # new weights, same path
    with torch.no_grad():
        for p in rebuilt.parameters():
            p.add_(0.01)
    rebuilt.save_pretrained(path)
    ask(common.load_llm(path, cpu())[0])
    (new_key,) = set(os.listdir(out)) - before
    for f in os.listdir(out):                               # a cache under an earlier version's key
        os.remove(os.path.join(out, f))
    stamp = common.model_stamp
    monkeypatch.setattr(common, "model_stamp", lambda m, older=False: stamp(m, older=True))
    ask(common.load_llm(path, cpu())[0])
    monkeypatch.undo()
    (old_key,) = os.listdir(out)
    generated = []
    monkeypatch.setattr(common, "generate", lambda *a, **k: generated.append(1) or [[5]])
    ask(common.load_llm(path, cpu())[0])
    assert not generated and set(os.listdir(out)) == {old_key, new_key}    # read, copied to the new key
    for f in os.listdir(out):                   # under another tag, in per-process parts (torchrun)
        lines = read(os.path.join(out, f)).splitlines(keepends=True)
        os.remove(os.path.join(out, f))
        if f == new_key:
            for r in (0, 1):
                write(os.path.join(out, f.replace("-t-", "-v-") + f".rank{r}"), "".join(lines[r::2]))
    ask(common.load_llm(path, cpu())[0])
    assert not generated and new_key in os.listdir(out)


def test_generate_texts_records_whether_an_answer_ended(tiny, tmp_path, monkeypatch):
    """ended: the answer stopped at an end token before the limit (generate cuts the end token, so
    exactly: fewer ids than max_new_tokens); kept in the cache; None for a line without it."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    outs = {3: [5, 6, 7, 8], 2: [5, 6]}                     # prompt length -> the ids generated
    monkeypatch.setattr(common, "generate", lambda llm, sp, eos, n: [
        outs[int(m.sum())] for m in sp.attention_mask])
    cache = str(tmp_path / "gen.jsonl")
    texts, ended = common.generate_texts(llm, tok, [[5, 6, 7], [8, 9]], 4, 2, cache, with_ended=True)
    assert ended == [False, True] and texts[1] == common.answer_text(tok, [5, 6])
    assert common.generate_texts(llm, tok, [[5, 6, 7], [8, 9]], 4, 2, cache, with_ended=True) == (texts, ended)
    write(cache, json.dumps({"i": 2, "text": "old"}) + "\n", "a")       # a line from before the flag
    assert common.generate_texts(llm, tok, [[5, 6, 7], [8, 9], [1]], 4, 2, cache, with_ended=True)[1] == \
        [False, True, None]

def test_answers_for_a_read_only_folder_are_generated_not_kept(tiny, tmp_path, monkeypatch, capsys):
    """--eval of a run in a folder it cannot write (a shared model store): the answers are made
    and said not to be kept (it raised a traceback opening its cache to append)."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    args = types.SimpleNamespace(prompt="auto", gen_batch_size=2)
    texts = common.cached_answers(llm, tok, "go on", ["a b", "c"], args, 3, str(tmp_path), "eval")
    assert len(texts) == 2 and not os.listdir(tmp_path)
    assert f"{tmp_path}: not writable: the frozen LLM's answers (eval) are generated, not kept" in capsys.readouterr().err


def test_continuation_targets_are_the_tokens_the_llm_wrote(tmp_path, monkeypatch):
    """A byte-level BPE LLM answering after "###[Assistant]:" writes " the red fox" ("Ġthe" first)
    and ends it with a newline: the cached text, tokenized again as BLSP's and BLSP-KD's targets
    are, gives those very tokens (stripped, it gave "the": another first token, and no newline)."""
    tok = ssr_bpe_tokenizer()
    llm = tiny_llama(tok)
    wrote = tok(" the red fox\n", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(wrote)[0] == "Ġthe"
    monkeypatch.setattr(common, "generate", lambda llm, sp, eos, n: [wrote + [tok.eos_token_id]] * len(sp.spans))
    args = blsp.BLSPArgs(prompt="blsp")
    items = blsp.continuation_data(llm, tok, [{"text": "A b."}, {"text": "c"}], args, str(tmp_path), "train")
    conts = [it["continuation_llm"] for it in items]
    assert [list(ids) for ids in common.each_ids(tok, conts)] == [wrote, wrote]
    kd = blsp_kd.continuation_data(llm, tok, [{"text": "A b."}], blsp_kd.KDArgs(prompt="blsp"), str(tmp_path), "kd")
    assert list(kd[0]["response_ids"]) == wrote + [tok.eos_token_id]
    assert common.read_texts(glob.glob(str(tmp_path / "answers-train-*.jsonl"))[0])[0] == (" the red fox\n", True)


def test_generate_texts_shared_by_two_processes(tiny, tmp_path):
    """Under torchrun each process generates its share (i % world == rank) into its own file;
    both return every text, the same as one process."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    prompts = [[5 + k, 6, 7 + k % 3][:1 + k % 3] for k in range(7)]
    one = common.generate_texts(llm, tok, prompts, 4, 2)
    script = tmp_path / "gen.py"
    script.write_text(f"""
import json, sys, torch, common
device, rank, world = common.setup(common.Args(device="cpu"))
llm, tok = common.load_llm({tiny['llm']!r}, device)
texts = common.generate_texts(llm, tok, {prompts!r}, 4, 2, {str(tmp_path / "gen.jsonl")!r})
json.dump(texts, open({str(tmp_path)!r} + f"/out{{rank}}.json", "w"))
""")
    r = run_python(script, torchrun=True)
    assert r.returncode == 0, r.stderr[:3000]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out{rank}.json").read_text()) == one
        part = [json.loads(x)["i"] for x in (tmp_path / f"gen.jsonl.rank{rank}").read_text().splitlines()]
        assert sorted(part) == [i for i in range(len(prompts)) if i % 2 == rank]
    assert common.generate_texts(llm, tok, prompts, 4, 2, str(tmp_path / "gen.jsonl")) == one  # read back,
    assert not (tmp_path / "gen.jsonl").exists()                  # nothing redone (no empty file either)

def test_losses_take_the_logits_each_family_makes(tmp_path):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale, Gemma 2
    soft-caps them: the losses' output layer (common.output_layer) gives the logits of the model's
    own forward (it applied the bare lm_head: another temperature). Gemma 2, which has no SDPA
    attention, loads with eager attention (it was refused). A multimodal checkpoint (Gemma 3 4B+)
    is refused in one line (it failed in generation)."""
    from transformers import CohereConfig, Gemma2Config, GraniteConfig
    tok = common.default_tokenizer()
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for cfg in (GraniteConfig(logits_scaling=8.0, **small), CohereConfig(logit_scale=0.0625, **small),
                Gemma2Config(final_logit_softcapping=0.5, head_dim=16, **small)):
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        folder = tmp_path / cfg.model_type
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        llm, _ = common.load_llm(str(folder), cpu())
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            ref = llm(inputs_embeds=x).logits
            hidden = llm.base_model(inputs_embeds=x).last_hidden_state
        mask = torch.ones(2, 5, dtype=torch.bool)
        torch.testing.assert_close(common.logits_at(llm, hidden, mask), ref.flatten(0, 1).float(), atol=1e-5, rtol=1e-4)
        y = torch.randint(0, ref.shape[-1], (10,))
        ce = common.per_row_loss(llm, lambda l, t: F.cross_entropy(l, t, reduction="none"), [hidden.flatten(0, 1)], [y])
        torch.testing.assert_close(ce, F.cross_entropy(ref.flatten(0, 1).float(), y, reduction="none"))
        assert (llm.config._attn_implementation == "eager") == (cfg.model_type == "gemma2")
    from transformers import Gemma3Config
    Gemma3Config().save_pretrained(tmp_path / "gemma3")          # (its config only: refused from it)
    with pytest.raises(common.UserError, match="a multimodal checkpoint \\(gemma3, its language model in text_config\\)"):
        common.load_llm(str(tmp_path / "gemma3"), cpu())


def test_wer():
    assert common.wer(["the cat sat"], ["the cat sat"]) == 0
    assert common.wer(["The cat, sat!"], ["the bat sat down"]) == pytest.approx(2 / 3)
    assert common.normalize("It's  A Test.") == "it's a test"


def test_wer_and_bleu_keep_every_script():
    """normalize kept [a-z0-9'] only: German lost its umlauts ("ber das caf"), Hindi and Chinese
    vanished, and two different Chinese sentences scored WER 0."""
    assert common.normalize("Über das Café!") == "über das café"
    assert common.normalize("Don’t stop, 42!") == "don't stop 42"
    assert common.normalize("हिन्दी भाषा।") == "हिन्दी भाषा"                    # (vowel signs, virama kept)
    assert common.wer(["今天 天气 很好"], ["完全 不同"]) == 1.0
    assert common.wer(["Das Mädchen läuft"], ["das madchen läuft"]) == pytest.approx(1 / 3)
    assert common.corpus_bleu(["Ein schönes Haus am großen See"], ["ein schönes Haus am großen See"]) == \
        pytest.approx(100)


def test_normalize_keeps_letters_marks_digits_and_apostrophes_of_every_character():
    """normalize's translate table against the rule written per character, over the first 70k
    code points (Latin, Greek, Cyrillic, Indic, CJK, symbols, punctuation, controls) at once."""
    every = "".join(chr(c) for c in range(1, 70000) if not 0xD800 <= c < 0xE000)
    s = unicodedata.normalize("NFKC", every).casefold().replace("\u2019", "'")
    slow = " ".join("".join(c if c == "'" or unicodedata.category(c)[0] in "LMN" else " " for c in s).split())
    assert common.normalize(every) == slow and len(slow.split()) > 100


def test_each_ids_equals_tokenizing_each_text_alone():
    """The batched tokenization of many texts (chunk by chunk) gives each text's own ids, as input
    after an instruction or as a target, for a BPE and for a legacy SentencePiece normalizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tk.train_from_iterator(["the red fox ran", " a"], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    texts = ["the red fox", "", "a fox ran", "the the the red", "fox"] * 3
    for tok in (ssr_bpe_tokenizer(), PreTrainedTokenizerFast(tokenizer_object=tk)):
        for chunk in (1, 4, 1024):
            assert list(common.each_ids(tok, texts, as_input=True, chunk=chunk)) == \
                [common.input_ids(tok, t) for t in texts]
            assert list(common.each_ids(tok, texts, chunk=chunk)) == [common.target_ids(tok, t) for t in texts]
        assert tok.unk_token_id not in common.input_ids(tok, "the red fox")     # (real words)


# ============================================================================================
# The training loop

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.drop = nn.Dropout(0.3)


def toy_step(model):
    """A loss summed over 'target tokens': one unit per sample, from the batch's audio."""
    def step(batch):
        x = torch.stack([batch["wave"][:, :100].mean(1), batch["wave"][:, :100].std(1),
                         batch["wave_lens"].float() / 1e5], 1)
        y = model.drop(model.lin(x)).squeeze(1)
        return ((y - 1) ** 2).sum(), len(y), dict(mean=float(y.detach().mean()))
    return step


def raising_at(step, k, error):
    """step, but its k-th call raises error (bad data, a crash) instead."""
    calls = []

    def f(batch):
        calls.append(1)
        if len(calls) == k:
            raise error
        return step(batch)
    return f


def toy_args(tmp_path, **kw):
    a = common.Args(out=str(tmp_path), steps=6, batch_size=4, lr=0.1, warmup=2, log_every=1,
                    seed=0)
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def losses(out):
    return [r["loss"] for r in map(json.loads, read(os.path.join(out, "metrics.jsonl")).splitlines())
            if "split" not in r]


def test_training_loop_waits_for_the_gpu_only_to_log(tiny, tmp_path, monkeypatch):
    """Around a step that itself never waits, CUDA's path of common.train (data to the device,
    accumulation, clipping, fused AdamW with the non-finite check on the device, schedule) adds no
    wait per step: under bench.HostSyncs a 12-step run counts as many as a 4-step one (the final
    log line and checkpoint), and logging every 4 steps adds the reads of one log line each (data
    loading, all on the CPU, left out). (On a CPU, unfused AdamW reads the loss every step: free.)"""
    import bench
    items, to_device, make = data.read_manifest(tiny["train"]), common.to_device, common.make_optimizer
    monkeypatch.setattr(common, "make_optimizer", lambda params, args, device, lr_scale=(): torch.optim.AdamW(
        [dict(params=g["params"], weight_decay=g["weight_decay"], lr_scale=g["lr_scale"])
         for g in make(params, args, device, lr_scale).param_groups], lr=args.lr, fused=True))
    model = Toy()

    def step(batch):                         # the batch's audio only: no read, no copy
        w = batch["wave"][:, :100]
        y = model.drop(model.lin(torch.stack([w.mean(1), w.std(1), w.abs().max(1).values], 1))).squeeze(1)
        return ((y - 1) ** 2).sum(), len(batch["text"]), dict(mean=y.detach().mean())
    counts = {}
    for steps, every in ((4, 100), (12, 100), (12, 4)):
        syncs = bench.HostSyncs()
        monkeypatch.setattr(common, "to_device", lambda b, d: syncs.mark(b["wave_lens"]) or to_device(b, d))
        with syncs:
            common.train(toy_args(tmp_path / f"{steps}-{every}", steps=steps, log_every=every, grad_accum=2,
                                  save_every=0), model, step, items, cpu(), method="toy")
        counts[steps, every] = syncs.total(skip=("data.py",))
    assert counts[4, 100] == counts[12, 100] > 0, counts
    assert counts[12, 4] - counts[12, 100] == 2 * 4, counts      # 2 more log lines: loss, grad norm,
    #                                                              non-finite check, `mean` each


def test_grad_accumulation_equals_one_large_batch(tiny, tmp_path):
    items = data.read_manifest(tiny["train"])
    grads = []
    for bs, acc in ((8, 1), (4, 2)):
        m = Toy()
        m.drop.p = 0.0
        seen = []
        step = toy_step(m)

        def fn(batch):
            seen.append(sorted(batch["text"]))
            return step(batch)
        args = toy_args(tmp_path / f"{bs}", steps=1, batch_size=bs, grad_accum=acc, clip=0.0, lr=0.0,
                        warmup=1)
        orig = torch.optim.AdamW.step
        captured = {}

        def spy(self, *a, **k):
            captured["g"] = [p.grad.clone() for p in m.parameters()]
            return orig(self, *a, **k)
        torch.optim.AdamW.step = spy
        try:
            common.train(args, m, fn, items, cpu(), method="toy")
        finally:
            torch.optim.AdamW.step = orig
        grads.append((captured["g"], sorted(sum(seen, []))))
    # a batch of 8 vs 2 x 4: not the same utterances (buckets differ), so compare against the
    # direct mean gradient over exactly the utterances each run saw
    for g, texts in grads:
        m = Toy()
        by_text = {it["text"]: it for it in items}
        batch = common.to_device(data.collate([dict(by_text[t], wave=data.load_audio(by_text[t]["audio"]))
                                               for t in texts]), cpu())
        m.drop.p = 0.0
        loss, n, _ = toy_step(m)(batch)
        (loss / n).backward()
        for a, b in zip(g, m.parameters()):
            torch.testing.assert_close(a, b.grad, atol=1e-5, rtol=1e-4)


def test_optimizer_gets_the_token_normalised_clipped_gradient_at_the_scheduled_lr(tiny, tmp_path):
    """What AdamW's step receives, with micro-batches of unequal unit counts (a weight per
    utterance, as target tokens): the gradient of sum(loss sums) / sum(units) over both
    micro-batches (not a mean of per-micro-batch means, nor per sample), clipped after that
    normalisation to exactly --clip, at lr_at(step) of the step being taken."""
    items = data.read_manifest(tiny["train"])

    def weighted_step(model):
        def step(batch):
            w = (batch["wave_lens"] // 1000 + 1).float()          # 'tokens' per utterance: unequal
            x = torch.stack([batch["wave"][:, :100].mean(1), batch["wave"][:, :100].std(1),
                             batch["wave_lens"].float() / 1e5], 1)
            return (w * (model.lin(x).squeeze(1) - 1) ** 2).sum(), int(w.sum()), {}
        return step

    def direct_grad(batches):
        m = Toy()
        loss = sum(weighted_step(m)(b)[0] for b in batches) / sum(weighted_step(m)(b)[1] for b in batches)
        loss.backward()
        return [p.grad for p in m.parameters()]

    for clip in (0.0, 1e-3):
        m, seen, got = Toy(), [], []
        m.drop.p = 0.0
        step = weighted_step(m)
        args = toy_args(tmp_path / f"clip{clip}", steps=2, batch_size=4, grad_accum=2, clip=clip, lr=0.1,
                        warmup=4, weight_decay=0.0)
        orig = torch.optim.AdamW.step

        def spy(self, *a, **k):
            got.append(([p.grad.clone() for p in m.parameters()], [g["lr"] for g in self.param_groups]))
            return orig(self, *a, **k)
        torch.optim.AdamW.step = spy
        try:
            common.train(args, m, lambda b: seen.append(b) or step(b), items, cpu(), method="toy")
        finally:
            torch.optim.AdamW.step = orig
        assert [lrs[0] for _, lrs in got] == pytest.approx([common.lr_at(0, args), common.lr_at(1, args)])
        units = [weighted_step(m)(b)[1] for b in seen[:2]]
        assert units[0] != units[1] * len(seen[0]["text"]) / len(seen[1]["text"])   # (unequal per sample)
        want = direct_grad(seen[:2])
        norm = torch.cat([g.flatten() for g in want]).norm()
        if clip:
            assert norm > 10 * clip
            want = [g * clip / norm for g in want]
        for a, b in zip(got[0][0], want):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


def test_resume_gives_the_same_losses(tiny, tmp_path):
    items = data.read_manifest(tiny["train"])
    full_m = Toy()
    common.train(toy_args(tmp_path / "full"), full_m, toy_step(full_m), items, cpu(), method="toy")
    half = Toy()
    step, calls = toy_step(half), []

    def interrupted_at_step_4(batch):          # Ctrl-C in the middle of step 4
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(batch)
    with pytest.raises(SystemExit) as e:
        common.train(toy_args(tmp_path / "half"), half, interrupted_at_step_4, items, cpu(), method="toy")
    assert e.value.code == 130 and read(tmp_path / "half" / "latest").strip() == "ckpt-3"
    again = Toy()
    common.train(toy_args(tmp_path / "half", steps=6, resume=str(tmp_path / "half")), again,
                 toy_step(again), items, cpu(), method="toy")
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "half"), abs=1e-6)
    torch.testing.assert_close(full_m.lin.weight, again.lin.weight)
    # the checkpoint is complete and `latest` points at it
    latest = read(tmp_path / "half" / "latest").strip()
    assert latest == "ckpt-6" and not any(p.name.endswith(".tmp") for p in (tmp_path / "half").iterdir())



def test_a_stop_while_a_checkpoint_is_written_waits_until_it_is_whole(tiny, tmp_path, monkeypatch):
    """A second Ctrl-C (or a scheduler's second SIGTERM) in the final save used to stop it half
    written: no checkpoint, the steps since the last lost. Now the save finishes first; one in a
    --save-every save stops the run once it is whole. What a killed save left half-written is
    removed when the run resumes; the resumed run gives the uninterrupted losses."""
    items = data.read_manifest(tiny["train"])
    full_m = Toy()
    common.train(toy_args(tmp_path / "full"), full_m, toy_step(full_m), items, cpu(), method="toy")
    save, signals = common.save_checkpoint, []

    def signalled_save(*a, **k):
        if signals:
            os.kill(os.getpid(), signals.pop())         # in the middle of writing it
        return save(*a, **k)
    monkeypatch.setattr(common, "save_checkpoint", signalled_save)
    half = Toy()
    step, calls = toy_step(half), []

    def interrupted_at_step_4(batch):
        calls.append(1)
        if len(calls) == 4:
            signals.append(signal.SIGINT)                # the second Ctrl-C comes in the save
            raise KeyboardInterrupt
        return step(batch)
    def exit_code(run):             # (a stop that escapes train() fails the test, not the session)
        try:
            run()
        except SystemExit as e:
            return e.code
        except KeyboardInterrupt as e:
            return f"{type(e).__name__} escaped train()"
    code = exit_code(lambda: common.train(toy_args(tmp_path / "half"), half, interrupted_at_step_4,
                                          items, cpu(), method="toy"))
    assert code == 130 and read(tmp_path / "half" / "latest").strip() == "ckpt-3"
    assert sorted(p.name for p in (tmp_path / "half").iterdir() if p.name.startswith("ckpt")) == ["ckpt-3"]
    signals.append(signal.SIGTERM)                       # a SIGTERM in the --save-every save of step 4
    os.makedirs(tmp_path / "half" / "ckpt-9.tmp4242")   # (a killed save's leftover)
    m = Toy()
    code = exit_code(lambda: common.train(toy_args(tmp_path / "half", resume=str(tmp_path / "half"),
                                                   save_every=4), m, toy_step(m), items, cpu(), method="toy"))
    assert code == 143 and read(tmp_path / "half" / "latest").strip() == "ckpt-4"
    assert sorted(p.name for p in (tmp_path / "half").iterdir() if p.name.startswith("ckpt")) == ["ckpt-4"]
    assert not signals
    monkeypatch.setattr(common, "save_checkpoint", save)
    again = Toy()
    common.train(toy_args(tmp_path / "half", resume=str(tmp_path / "half")), again, toy_step(again), items,
                 cpu(), method="toy")
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "half"), abs=1e-6)
    torch.testing.assert_close(full_m.lin.weight, again.lin.weight)


def test_bad_data_met_mid_run_keeps_the_steps_done(tiny, tmp_path):
    """A DataError at step 3 (bad audio, SSR's `chars`) saves step 2 before it stops the run, and
    --resume continues exactly: nothing trained is lost."""
    items = data.read_manifest(tiny["train"])
    full_m = Toy()
    common.train(toy_args(tmp_path / "full"), full_m, toy_step(full_m), items, cpu(), method="toy")
    m = Toy()
    bad_at_step_3 = raising_at(toy_step(m), 3, data.DataError("m.jsonl:7: cannot read audio"))
    with pytest.raises(data.DataError, match=r"^m.jsonl:7: cannot read audio; step 2 is saved: .* --resume "):
        common.train(toy_args(tmp_path / "run", save_every=2), m, bad_at_step_3, items, cpu(), method="toy")
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("ckpt")] == ["ckpt-2"]  # once
    again = Toy()
    common.train(toy_args(tmp_path / "run", resume=str(tmp_path / "run")), again, toy_step(again), items,
                 cpu(), method="toy")
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "run"), abs=1e-6)


def test_a_crash_mid_run_keeps_the_steps_done(tiny, tmp_path):
    """Any other error in a step (CUDA out of memory, a bug) saves the last whole step before it is
    raised, and says so in the error (it saved nothing: up to --save-minutes of work lost); --resume
    continues exactly."""
    items = data.read_manifest(tiny["train"])
    full_m = Toy()
    common.train(toy_args(tmp_path / "full"), full_m, toy_step(full_m), items, cpu(), method="toy")
    m = Toy()
    out_of_memory_in_step_4 = raising_at(toy_step(m), 4, RuntimeError("CUDA out of memory (a stand-in)"))
    with pytest.raises(RuntimeError, match="out of memory") as e:
        common.train(toy_args(tmp_path / "run"), m, out_of_memory_in_step_4, items, cpu(), method="toy")
    assert read(tmp_path / "run" / "latest").strip() == "ckpt-3"
    assert f"(step 3 is saved: --resume {tmp_path / 'run'} continues from it)" in e.value.__notes__
    again = Toy()
    common.train(toy_args(tmp_path / "run", resume=str(tmp_path / "run")), again, toy_step(again), items,
                 cpu(), method="toy")
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "run"), abs=1e-6)
    torch.testing.assert_close(full_m.lin.weight, again.lin.weight)


def test_save_minutes_checkpoints_as_time_passes(tiny, tmp_path):
    """--save-minutes: a checkpoint when that much time has passed since the last (here: every
    step), and not one more at the end for the same step; off with 0."""
    items = data.read_manifest(tiny["train"])
    for minutes, want in ((1e-9, ["ckpt-1", "ckpt-2", "ckpt-3"]), (0, [None, None, None])):
        m, seen = Toy(), []
        step, out = toy_step(m), tmp_path / str(minutes)

        def looking(batch):
            seen.append(read(out / "latest").strip() if (out / "latest").exists() else None)
            return step(batch)
        common.train(toy_args(out, steps=4, save_minutes=minutes), m, looking, items, cpu(), method="toy")
        assert seen[1:] == want and sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt-4"]


def test_a_log_file_gets_plain_lines_not_a_progress_bar(tiny, tmp_path, capsys):
    """Not a terminal (a cluster job's log): no tqdm bar (one endless line of carriage returns
    there), but a line at a logged step, at most every 10 s, and at the last step."""
    items, m = data.read_manifest(tiny["train"]), Toy()
    common.train(toy_args(tmp_path / "run", steps=6), m, toy_step(m), items, cpu(), method="toy")
    out = capsys.readouterr()
    lines = [x for x in out.out.splitlines() if x.startswith("step ")]
    assert "\r" not in out.out + out.err and "%|" not in out.out + out.err
    assert [x.split(":")[0] for x in lines] == ["step 1/6", "step 6/6"]
    assert re.fullmatch(r"step 6/6: loss \d+\.\d{4}, lr .*, [\d.]+ samples/s, \d+ tokens/s, 0\.0 min to go", lines[-1])


def test_resuming_a_finished_run_only_validates(tiny, tmp_path, capsys):
    """--resume of a run that reached --steps: nothing trained, no new checkpoint, and its final
    validation is run again in place of the old one (metrics.jsonl holds it once)."""
    items, m = data.read_manifest(tiny["train"]), Toy()
    out = tmp_path / "run"
    common.train(toy_args(out, steps=2, eval_every=1), m, toy_step(m), items, cpu(),
                 valid_fn=lambda step: dict(x=float(step)), method="toy")
    before = read(out / "metrics.jsonl")
    w = m.lin.weight.detach().clone()
    res = common.train(toy_args(out, steps=2, eval_every=1, resume=str(out)), m, toy_step(m), items, cpu(),
                       valid_fn=lambda step: dict(x=float(step)), method="toy")
    assert res == dict(x=2.0) and "nothing to train" in capsys.readouterr().out
    assert read(out / "metrics.jsonl") == before                 # valid @1, @2 once each
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-2"]
    assert torch.equal(w, m.lin.weight)
    other = tmp_path / "other"              # resumed into another --out: the step is saved there
    common.train(toy_args(other, steps=2, resume=str(out)), m, toy_step(m), items, cpu(), method="toy")
    assert read(other / "latest").strip() == "ckpt-2"


def test_lr_scale_trains_those_parameters_at_a_fraction_of_the_lr(tiny, tmp_path):
    """train(lr_scale=[(params, f)]): AdamW's first update moves every weight by about the lr
    (m / sqrt(v) = +-1), so the scaled Linear moves f x as far; resuming takes this run's factor."""
    items = data.read_manifest(tiny["train"])
    m, other = Toy(), nn.Linear(3, 1)
    m.other = other
    w0, o0 = m.lin.weight.detach().clone(), other.weight.detach().clone()
    step = toy_step(m)

    def both(batch):
        loss, n, logs = step(batch)
        return loss + other(batch["wave"][:, :3]).square().sum(), n, logs
    a = toy_args(tmp_path / "run", steps=1, warmup=1, weight_decay=0.0)
    common.train(a, m, both, items, cpu(), method="toy", lr_scale=[(other.parameters(), 0.1)])
    assert (m.lin.weight - w0).abs().flatten().tolist() == pytest.approx([0.1] * 3, rel=1e-3)
    assert (other.weight - o0).abs().flatten().tolist() == pytest.approx([0.01] * 3, rel=1e-3)
    o1 = other.weight.detach().clone()      # resumed with another factor: this one applies
    common.train(toy_args(tmp_path / "run", steps=2, warmup=1, weight_decay=0.0, schedule="constant",
                          resume=str(tmp_path / "run")), m, both, items, cpu(), method="toy",
                 lr_scale=[(other.parameters(), 0.5)])
    assert 0.02 < float((other.weight.detach() - o1).abs().max()) <= 0.05 + 1e-6


def test_resume_takes_this_runs_optimizer_settings(tiny, tmp_path, monkeypatch):
    """--resume with other --betas and --weight-decay, or on another device (a CPU run resumed on
    CUDA: fused AdamW, its step counts on the device), uses them: the checkpoint's were kept."""
    items, m = data.read_manifest(tiny["train"]), Toy()
    common.train(toy_args(tmp_path / "run", steps=2), m, toy_step(m), items, cpu(), method="toy")
    make = common.make_optimizer

    def fused(*a, **k):                                   # CUDA's optimizer, on the CPU
        opt = make(*a, **k)
        for g in opt.param_groups:
            g["fused"] = True
        return opt
    monkeypatch.setattr(common, "make_optimizer", fused)
    common.train(toy_args(tmp_path / "run", steps=3, betas="0.8,0.9", weight_decay=0.05,
                          resume=str(tmp_path / "run")), m, toy_step(m), items, cpu(), method="toy")
    st = torch.load(os.path.join(common.find_checkpoint(str(tmp_path / "run")), "train_state.pt"),
                    weights_only=False)
    groups = st["optimizer"]["param_groups"]
    assert st["step"] == 3 and all(g["betas"] == (0.8, 0.9) and g["fused"] for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]


def test_sigterm_saves_the_last_finished_step(tiny, tmp_path):
    """kill (a cluster's preemption) stops like Ctrl-C: checkpoint of the last finished step, exit 143."""
    import signal
    items = data.read_manifest(tiny["train"])
    m = Toy()
    step, calls = toy_step(m), []

    def killed_in_step_3(batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(batch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        common.train(toy_args(tmp_path / "run"), m, killed_in_step_3, items, cpu(), method="toy")
    assert e.value.code == 143 and read(tmp_path / "run" / "latest").strip() == "ckpt-2"
    assert signal.getsignal(signal.SIGTERM) is before                # the handler is put back

def test_a_signal_during_the_update_saves_the_step_it_finished(tiny, tmp_path, monkeypatch):
    """SIGTERM while the optimizer updates the weights: raised at once, it left step 3's weights
    saved as step 2, and the resumed run updated them twice. Now it waits for the step's end."""
    import signal
    items, make = data.read_manifest(tiny["train"]), common.make_optimizer

    def run(out, kill_in_update=None, resume=False):
        torch.manual_seed(0)
        m = Toy()

        def made(*a, **kw):
            opt, calls = make(*a, **kw), []
            real = opt.step

            def step():
                real()
                calls.append(1)
                if len(calls) == kill_in_update:
                    os.kill(os.getpid(), signal.SIGTERM)     # (its handler runs here, at once)
                    torch.zeros(1)
            opt.step = step
            return opt
        monkeypatch.setattr(common, "make_optimizer", made)
        common.train(toy_args(out, resume=str(out) if resume else None), m, toy_step(m), items, cpu(),
                     method="toy")
        return m.lin.weight.detach().clone()
    full = run(tmp_path / "full")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "half", kill_in_update=3)
    assert e.value.code == 143 and read(tmp_path / "half" / "latest").strip() == "ckpt-3"
    torch.testing.assert_close(run(tmp_path / "half", resume=True), full)
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "full"), abs=1e-7)


def test_a_wrong_duration_is_said_once_a_process(tiny, capfd, monkeypatch):
    """A manifest duration far from the audio's is said once, not again by each epoch's, stage's
    or validation's loader (SSR said it three times), and as written ("5.5314 s", not a float's
    "5.5314000000000005")."""
    monkeypatch.setattr(data, "_WARNED", set())
    item = dict(data.read_manifest(tiny["train"])[0], duration=0.1 + 0.2)       # 0.30000000000000004
    for _ in range(2):
        data.SpeechDataset([item])[0]
    err = capfd.readouterr().err
    assert err.count("warning: ") == 1 and "'duration' 0.3 s, but the audio lasts" in err
    monkeypatch.setattr(data, "_WARNED", set())        # loader workers (CUDA's default): each starts
    loader, sampler = data.make_loader([item] * 4, 2, workers=2)     # each epoch with none said
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert all("_warning" not in b for b in loader)
    assert capfd.readouterr().err.count("warning: ") == 1


def test_loader_workers_default(monkeypatch):
    """--workers left out: none on CPU (the training threads use the cores); on CUDA 4, at most
    this process's share of the cores less one; given, as given."""
    args, cpu_, cuda = common.Args(), torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert common.loader_workers(args, cpu_) == 0 and common.loader_workers(args, cuda) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                     # torchrun, 8 GPUs, 16 cores
    assert common.loader_workers(args, cuda) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert common.loader_workers(args, cuda) == 0
    args.workers = 3
    assert common.loader_workers(args, cuda) == 3 and common.loader_workers(args, cpu_) == 3


def test_loader_workers_leave_a_group_sigterm_to_the_main_process(tiny, tmp_path):
    """A cluster's preemption signals the whole process group: the loader workers it killed made
    the main process raise "DataLoader worker ... killed by signal" wherever it was (its
    checkpoint too). Workers now ignore it; the main process saves and exits 143."""
    import signal
    script = tmp_path / "w.py"
    script.write_text(f"""
import sys, time, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
args = toy_args(sys.argv[1], batch_size=2, steps=1000, workers=2)
m = Toy()
step = toy_step(m)
common.train(args, m, lambda b: (time.sleep(0.05), step(b))[1], data.read_manifest({tiny['train']!r}),
             common.setup(args)[0], method="toy")
""")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(script), str(out)], cwd=HERE, start_new_session=True,
                         env=dict(os.environ, PYTHONPATH=HERE, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):                                # a few logged steps: the workers run
        if (out / "metrics.jsonl").exists() and len(read(out / "metrics.jsonl").splitlines()) >= 5:
            break
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143 and "interrupted (SIGTERM)" in stdout, stdout[-1000:] + stderr[-2000:]
    assert "killed by signal" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert common.find_checkpoint(str(out))


def test_cuda_rng_state_is_this_process_gpu_only(monkeypatch):
    """The CUDA RNG saved and restored is the process's own GPU's: every visible GPU's (a list)
    failed to resume where fewer GPUs show (IndexError) and was restored by position; such older
    checkpoints resume with their entry for this GPU."""
    got = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: got.append((int(s[0]), device)))
    state = common.rng_state()
    dev = torch.device("cuda", 1)
    common.set_rng_state(dict(state, cuda=torch.tensor([7], dtype=torch.uint8)), dev)
    common.set_rng_state(dict(state, cuda=[torch.tensor([k], dtype=torch.uint8) for k in range(8)]), dev)
    common.set_rng_state(dict(state, cuda=[torch.tensor([0], dtype=torch.uint8)]), dev)   # (1 GPU then)
    common.set_rng_state(dict(state, cuda=torch.tensor([7], dtype=torch.uint8)), cpu())
    assert got == [(7, dev), (1, dev)]
    assert state["cuda"] is None or not isinstance(state["cuda"], (list, tuple))


def test_sigterm_in_a_validation_resumes_exactly(tiny, tmp_path):
    """A preemption while validating (on a real model, minutes of each run) saves the finished
    step with its own data position and RNG (it saved the step before's: the resumed run trained
    on a step's batches twice); the resumed run validates that step first (it went on without:
    that validation was lost), and validation leaves the RNG as it was, so it draws the same
    dropout masks. Toy's dropout is on."""
    import signal
    items = data.read_manifest(tiny["train"])

    def run(out, stop=False, resume=False):
        torch.manual_seed(0)
        m = Toy()

        def valid(step):
            torch.rand(5)                                      # validation draws too
            if stop and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return dict(v=0.0)
        common.train(toy_args(out, eval_every=2, resume=str(out) if resume else None), m, toy_step(m),
                     items, cpu(), valid_fn=valid, method="toy")
        return m.lin.weight.detach().clone()
    full = run(tmp_path / "full")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "half", stop=True)
    st = torch.load(os.path.join(common.find_checkpoint(str(tmp_path / "half")), "train_state.pt"),
                    weights_only=False)
    assert e.value.code == 143 and st["step"] == 2
    torch.testing.assert_close(run(tmp_path / "half", resume=True), full)
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "full"), abs=1e-7)
    valid_steps = lambda out: [r["step"] for r in map(json.loads, read(out / "metrics.jsonl").splitlines())
                               if r.get("split") == "valid"]
    assert valid_steps(tmp_path / "half") == valid_steps(tmp_path / "full") == [2, 4, 6]


def test_non_finite_gradients_skip_the_update_and_stop_saved(tiny, tmp_path):
    """A finite loss with a NaN gradient (here with --clip 0, where no norm was computed): its
    update is skipped, the run stops with that step saved (the weights of the step before), and
    --resume goes on after the bad batch, with the batches an unstopped run would have taken."""
    from safetensors.torch import load_file
    items, m, seen = data.read_manifest(tiny["train"]), Toy(), []
    step, calls, weights = toy_step(m), [], []

    def nan_gradient_in_step_3(batch):
        calls.append(1)
        seen.append(batch["text"])
        if len(calls) == 3:
            weights.append(m.lin.weight.detach().clone())
        loss, n, logs = step(batch)
        if len(calls) == 3:                                  # d sqrt(x)/dx at 0, times 0: NaN
            loss = loss + (m.lin.weight.sum() * 0).abs().sqrt()
        return loss, n, logs
    with pytest.raises(common.UserError, match=r"non-finite loss or gradients in step 3 \(loss [0-9.]+, gradient "
                       rf"norm nan; its clips: [^)]*\): its update was skipped; stopped with step 3 saved: --resume "
                       rf"{tmp_path / 'run'} "
                       r"goes on after that batch"):
        common.train(toy_args(tmp_path / "run", clip=0.0), m, nan_gradient_in_step_3, items, cpu(), method="toy")
    ck = common.find_checkpoint(str(tmp_path / "run"))
    assert ck.endswith("ckpt-3") and torch.equal(load_file(ck + "/trainable.safetensors")["lin.weight"], weights[0])
    common.train(toy_args(tmp_path / "run", clip=0.0, resume=str(tmp_path / "run")), m, nan_gradient_in_step_3,
                 items, cpu(), method="toy")
    assert len(seen) == 6 and torch.isfinite(m.lin.weight).all()
    full, m2 = [], Toy()
    step2 = toy_step(m2)
    common.train(toy_args(tmp_path / "full", clip=0.0), m2, lambda b: full.append(b["text"]) or step2(b), items,
                 cpu(), method="toy")
    assert seen == full


def test_config_method_of_runs_old_and_new(tmp_path):
    """The method a run directory holds: its config.json's; an earlier version's run, its
    checkpoint's, or (SSR, no config.json) its stages'; a folder of runs is none of them."""
    def run(path, method, config=True, stage=None):
        d = tmp_path / path / (stage or "")
        os.makedirs(d / "ckpt-1")
        write(d / "ckpt-1" / "meta.json", json.dumps(dict(method=method)))
        write(d / "latest", "ckpt-1")
        if config:
            write(tmp_path / path / "config.json", json.dumps(dict(lr=1.0)))
    write_new = tmp_path / "new"
    os.makedirs(write_new)
    write(write_new / "config.json", json.dumps(dict(method="blsp_kd")))
    run("old_blsp", "blsp")
    run("old_ssr", "ssr-aligner", config=False, stage="aligner")
    run("runs/a", "blsp")
    assert [common.config_method(str(tmp_path / d)) for d in ("new", "old_blsp", "old_ssr", "runs", "none")] \
        == ["blsp_kd", "blsp", "ssr", None, None]


def test_a_checkpoint_loads_only_into_a_model_it_fits_whole(tmp_path):
    """A trained part the checkpoint lacks (a layer more than it was trained with) is refused, not
    left as built; frozen parameters are not in a checkpoint and need not be."""
    two = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.AdamW(two.parameters())
    ck = common.save_checkpoint(str(tmp_path), two, opt, 1, 0, 1, dict(method="toy"))
    three = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(1, 1))
    with pytest.raises(common.UserError, match=r"does not fit this model \(it has no 2.weight\)"):
        common.load_trainable(three, ck)
    common.freeze(three[2])
    common.load_trainable(three, ck)
    torch.testing.assert_close(three[1].weight, two[1].weight)
    with pytest.raises(common.UserError, match=r"does not fit this model \(e.g. 1\.(weight|bias)\)"):
        common.load_trainable(nn.Sequential(nn.Linear(3, 3)), ck)


def test_ctrl_c_outside_a_training_loop_is_one_line(capsys):
    """Ctrl-C while models load or a validation runs outside common.train (SSR's stage-2 "before"):
    one line and exit 130 (SIGTERM: 143), not a traceback."""
    for raised, code in ((KeyboardInterrupt(), 130), (common.Terminated(), 143)):
        def main(argv=None):
            raise raised
        with pytest.raises(SystemExit) as e:
            common.guard(main)([])
        assert e.value.code == code and capsys.readouterr().err.startswith(
            f"interrupted ({'Ctrl-C' if code == 130 else 'SIGTERM'})\n")


def test_a_step_saved_again_never_leaves_latest_without_its_folder(tmp_path, monkeypatch):
    """The same step saved twice (a resume at its last step, a stop right after a --save-every
    save): a kill between the writes used to leave `latest` naming a deleted folder."""
    m = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(m.parameters())
    common.save_checkpoint(str(tmp_path), m, opt, 2, 0, 2, dict(method="toy"))
    real = os.replace

    def killed_at_the_rename(a, b):
        if os.path.basename(b).startswith("ckpt-2"):
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(str(tmp_path), m, opt, 2, 0, 2, dict(method="toy"))
    monkeypatch.setattr(os, "replace", real)
    assert common.find_checkpoint(str(tmp_path)).endswith("ckpt-2")        # the first one, whole
    assert common.save_checkpoint(str(tmp_path), m, opt, 2, 0, 2, dict(method="toy")).endswith("ckpt-2.1")
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt-2.1", "latest"]
    assert common.save_checkpoint(str(tmp_path), m, opt, 2, 0, 2, dict(method="toy")).endswith("ckpt-2")
    (tmp_path / "latest").write_text("ckpt-9")                          # (a hand-edited run)
    with pytest.raises(common.UserError, match="latest` names .*ckpt-9.*, which holds no checkpoint"):
        common.find_checkpoint(str(tmp_path))


def test_two_processes_saving_one_step_at_once_leave_it_whole(tmp_path):
    """Two processes that each meet bad audio in the same step save that step alone, at once: each
    writes through its own temporary folder (a shared one was emptied or refused by the other),
    and `latest` names one whole checkpoint."""
    import multiprocessing
    import safetensors.torch
    ctx = multiprocessing.get_context("fork")
    both_writing = ctx.Barrier(2, timeout=30)
    real = safetensors.torch.save_file

    def save(k):
        safetensors.torch.save_file = lambda *a, **kw: (both_writing.wait(), real(*a, **kw))[1]
        m = torch.nn.Linear(3, 1)
        common.save_checkpoint(str(tmp_path), m, None, 2, 0, 2, dict(method="toy"), rng=[k])
    ck = forked_saves_leave_one_checkpoint(ctx, [lambda: save(0), lambda: save(1)], tmp_path)
    assert torch.load(os.path.join(ck, "train_state.pt"), weights_only=False)["rng"] in ([0], [1])


def test_a_file_system_without_locks_still_gets_the_checkpoint(tmp_path, monkeypatch):
    """flock fails on some cluster file systems (Lustre mounted without flock: ENOSYS): the
    checkpoint is written all the same, unlocked."""
    import errno
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    common.save_checkpoint(str(tmp_path), torch.nn.Linear(3, 1), None, 2, 0, 2, dict(method="toy"))
    assert common.find_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_a_process_saving_while_another_cleans_up_keeps_the_checkpoint_latest_names(tmp_path):
    """Two processes save one step alone, the second just after the first's rename: without a
    lock, each one's clean-up deleted the other's folder and `latest` named neither."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    renamed = ctx.Event()

    def first():
        real = os.replace

        def stall_after_latest(a, b):                   # between `latest` and the clean-up
            real(a, b)
            if os.path.basename(b) == "latest":
                renamed.set(), time.sleep(1.5)
        os.replace = stall_after_latest
        common.save_checkpoint(str(tmp_path), torch.nn.Linear(3, 1), None, 2, 0, 2, dict(method="toy"), rng=[0])

    def second():
        renamed.wait(30)
        common.save_checkpoint(str(tmp_path), torch.nn.Linear(3, 1), None, 2, 0, 2, dict(method="toy"), rng=[1])
    forked_saves_leave_one_checkpoint(ctx, [first, second], tmp_path)


def forked_saves_leave_one_checkpoint(ctx, targets, run_dir):
    """Run each target in a forked process; they all succeed and leave one whole checkpoint."""
    procs = [ctx.Process(target=t) for t in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    ck = common.find_checkpoint(str(run_dir))
    assert sorted(os.listdir(run_dir)) == [".lock", os.path.basename(ck), "latest"]
    return ck


def test_train_runs_the_trained_parts_in_train_mode(tiny, tmp_path):
    """A part left in eval() (BLSP-KD's unfrozen encoder: freeze() made it so) trains with its
    dropout on; the loop does not wait for a validation to switch it."""
    items, m = data.read_manifest(tiny["train"]), Toy().eval()
    modes, step = [], toy_step(m)
    common.train(toy_args(tmp_path / "run", steps=2), m, lambda b: modes.append(m.drop.training) or step(b),
                 items, cpu(), method="toy")
    assert modes == [True, True]


def test_resume_errors(tiny, tmp_path, capsys):
    items = data.read_manifest(tiny["train"])
    with pytest.raises(common.UserError, match="no checkpoint"):
        (tmp_path / "empty").mkdir()
        m = Toy()
        common.train(toy_args(tmp_path / "x", resume=str(tmp_path / "empty")), m, toy_step(m), items, cpu())
    m = Toy()
    common.train(toy_args(tmp_path / "a", steps=1), m, toy_step(m), items, cpu(), method="toy")
    with pytest.raises(common.UserError, match="checkpoint of another method"):
        common.train(toy_args(tmp_path / "b", resume=str(tmp_path / "a")), m, toy_step(m), items, cpu(),
                     method="other")
    config = (tmp_path / "a" / "config.json").read_text()
    with pytest.raises(common.UserError, match=f"^--resume {tmp_path / 'a'}: the run was trained with "
                       "no --llm \\(the built-in default\\), not --llm other: a run resumes"):         # refused, naming the field: the
        common.train(toy_args(tmp_path / "a", steps=2, llm="other", resume=str(tmp_path / "a")), m,  # run's
                     toy_step(m), items, cpu(), method="toy", model_fields=("llm",))   # config as it was
    os.rename(tmp_path / "a" / "config.json", tmp_path / "config.json")
    with pytest.raises(common.UserError, match="checkpoint of another model"):     # (no config.json: the
        common.train(toy_args(tmp_path / "a", steps=2, llm="other", resume=str(tmp_path / "a")), m,  # hash)
                     toy_step(m), items, cpu(), method="toy", model_fields=("llm",))
    os.rename(tmp_path / "config.json", tmp_path / "a" / "config.json")
    assert (tmp_path / "a" / "config.json").read_text() == config
    # a fresh run into a run directory: refused, nothing of the old run touched
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    with pytest.raises(common.UserError, match="holds a run already .*ckpt-1.*--resume"):
        common.train(toy_args(tmp_path / "a", steps=1), m, toy_step(m), items, cpu(), method="toy")
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    # resumed: the metrics lines past the checkpoint (an interrupted run's) go; another batch
    # order: a warning naming what changed (the same order: none)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(step=7, loss=9.0)) + "\n" + '{"step": 8, "lo')
    capsys.readouterr()
    common.train(toy_args(tmp_path / "a", steps=2, resume=str(tmp_path / "a")), m, toy_step(m), items,
                 cpu(), method="toy")
    assert "warning" not in capsys.readouterr().err
    assert [r["step"] for r in map(json.loads, read(tmp_path / "a" / "metrics.jsonl").splitlines())] == [1, 2]
    # a fresh run where an earlier one stopped before its first checkpoint: its lines go
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text(json.dumps(dict(step=5, loss=1.0)) + "\n")
    common.train(toy_args(tmp_path / "c", steps=1), m, toy_step(m), items, cpu(), method="toy")
    assert [r["step"] for r in map(json.loads, read(tmp_path / "c" / "metrics.jsonl").splitlines())] == [1]
    common.train(toy_args(tmp_path / "a", steps=3, batch_size=2, resume=str(tmp_path / "a")), m, toy_step(m),
                 items[:-1], cpu(), method="toy")
    err = capsys.readouterr().err
    assert "warning: resumed with another data order" in err and "batch_size 4 -> 2" in err, err
    assert f"utterances {len(items)} -> {len(items) - 1}" in err and "seed" not in err
    # a checkpoint from before the layout of a step's batches (no grad_accum in its order): said
    # where that layout changed (--grad-accum 2), not where it did not (one process, one batch)
    ck = common.find_checkpoint(str(tmp_path / "a"))
    meta = json.loads(read(os.path.join(ck, "meta.json")))
    del meta["data"]["grad_accum"]
    write(os.path.join(ck, "meta.json"), json.dumps(meta))
    common.train(toy_args(tmp_path / "a", steps=4, batch_size=2, resume=str(tmp_path / "a")), m, toy_step(m),
                 items[:-1], cpu(), method="toy")
    assert "warning" not in capsys.readouterr().err
    ck = common.find_checkpoint(str(tmp_path / "a"))
    meta = json.loads(read(os.path.join(ck, "meta.json")))
    del meta["data"]["grad_accum"]
    write(os.path.join(ck, "meta.json"), json.dumps(meta))
    common.train(toy_args(tmp_path / "a", steps=5, batch_size=2, grad_accum=2, resume=str(tmp_path / "a")), m,
                 toy_step(m), items[:-1], cpu(), method="toy")
    assert "batch layout of an older version" in capsys.readouterr().err


def test_nan_loss_skips_its_update_then_stops_saved(tiny, tmp_path):
    """CPU (AdamW unfused): a NaN loss in step 3 is said at once, naming the step from 1 as the log
    lines do; its update is not made, and step 3 is saved with the weights of step 2."""
    items = data.read_manifest(tiny["train"])
    m, calls, weights = Toy(), [], []
    step = toy_step(m)

    def bad(batch):
        calls.append(1)
        if len(calls) == 3:
            weights.append({k: v.clone() for k, v in m.state_dict().items()})
        loss, n, lg = step(batch)
        return (loss * float("nan") if len(calls) == 3 else loss), n, lg
    with pytest.raises(common.UserError, match=r"non-finite loss or gradients in step 3 \(loss nan, gradient norm "
                                               r"nan; its clips: .*train.jsonl:\d+, .*train.jsonl:\d+, .*train.jsonl:"
                                               r"\d+, .*train.jsonl:\d+\): its update was skipped; stopped with step 3 "
                                               r"saved"):
        common.train(toy_args(tmp_path / "cpu", log_every=5), m, bad, items, cpu(), method="toy")
    assert read(tmp_path / "cpu" / "latest").strip() == "ckpt-3" and len(calls) == 3
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in weights[0].items())
    calls.clear()                           # the checkpoint before the trouble is kept (it was deleted)
    m = Toy()
    step = toy_step(m)
    with pytest.raises(common.UserError, match=rf"; the checkpoint before, ckpt-2, is kept too \(to go back to it, "
                                               rf"write ckpt-2 into {tmp_path / 'every2' / 'latest'}\)$"):
        common.train(toy_args(tmp_path / "every2", save_every=2), m, bad, items, cpu(), method="toy")
    assert sorted(d for d in os.listdir(tmp_path / "every2") if d.startswith("ckpt-")) == ["ckpt-2", "ckpt-3"]
    nan_at_once = lambda batch: (lambda l, n, lg: (l * float("nan"), n, lg))(*step(batch))   # (a diverged run:
    with pytest.raises(common.UserError, match=r"in step 4 .*the checkpoint before, ckpt-2, is kept too .*"  # again)
                                               r"; it came in the first step after the resume: the saved weights"):
        common.train(toy_args(tmp_path / "every2", save_every=2, resume=str(tmp_path / "every2")), m, nan_at_once,
                     items, cpu(), method="toy")
    assert sorted(d for d in os.listdir(tmp_path / "every2") if d.startswith("ckpt-")) == ["ckpt-2", "ckpt-4"]


def test_nan_loss_with_fused_adamw_skips_the_update_without_a_host_sync(tiny, tmp_path, monkeypatch):
    """CUDA's path (fused AdamW), run with the CPU's fused AdamW: a non-finite step is skipped on
    the device (found_inf) and said at the next log line (here step 5), with that step saved: the
    good steps after the bad one are kept. The weights are those of the CPU's path, stopped at
    step 3 and resumed to step 5 (the same batches, step 3's update skipped in both)."""
    from safetensors.torch import load_file
    items, make = data.read_manifest(tiny["train"]), common.make_optimizer

    def fused(params, args, device, lr_scale=()):
        opt = make(params, args, device, lr_scale)
        groups = [dict(params=g["params"], weight_decay=g["weight_decay"], lr_scale=g["lr_scale"])
                  for g in opt.param_groups]
        return torch.optim.AdamW(groups, lr=args.lr, betas=opt.defaults["betas"], fused=True)

    def nan_in_step_3(m):
        calls, step = [], toy_step(m)

        def bad(batch):
            calls.append(1)
            loss, n, lg = step(batch)
            return (loss * float("nan") if len(calls) == 3 else loss), n, lg
        return bad
    m = Toy()
    with pytest.raises(common.UserError, match=r"in one of steps 1 to 5: its update was skipped; stopped with "
                                               r"step 5 saved"):
        with monkeypatch.context() as mp:
            mp.setattr(common, "make_optimizer", fused)
            common.train(toy_args(tmp_path / "fused", steps=8, log_every=5, schedule="constant"), m,
                         nan_in_step_3(m), items, cpu(), method="toy")
    assert read(tmp_path / "fused" / "latest").strip() == "ckpt-5"
    with pytest.raises(common.UserError, match=r"in one of steps 6 to 8: ") as e:   # after a resume: a range,
        with monkeypatch.context() as mp:                                          # not "the first step"
            mp.setattr(common, "make_optimizer", fused)
            common.train(toy_args(tmp_path / "fused", steps=8, log_every=5, schedule="constant",
                                  resume=str(tmp_path / "fused")), m, nan_in_step_3(m), items, cpu(), method="toy")
    assert "first step after the resume" not in str(e.value)
    shutil.rmtree(tmp_path / "fused")
    m = Toy()
    with pytest.raises(common.UserError):
        with monkeypatch.context() as mp:
            mp.setattr(common, "make_optimizer", fused)
            common.train(toy_args(tmp_path / "fused", steps=8, log_every=5, schedule="constant"), m,
                         nan_in_step_3(m), items, cpu(), method="toy")
    m2 = Toy()
    with pytest.raises(common.UserError, match="in step 3 "):
        common.train(toy_args(tmp_path / "cpu", steps=8, log_every=5, schedule="constant"), m2, nan_in_step_3(m2),
                     items, cpu(), method="toy")
    common.train(toy_args(tmp_path / "cpu", steps=5, log_every=5, schedule="constant", resume=str(tmp_path / "cpu")),
                 m2, toy_step(m2), items, cpu(), method="toy")         # (constant: --steps 5 is the same lr)
    m3 = Toy()                                 # bad data after a skipped step: said in its error
    bad_audio_in_step_4 = raising_at(nan_in_step_3(m3), 4, data.DataError("m.jsonl:9: cannot read audio"))
    with pytest.raises(data.DataError, match=r"step 3 is saved \(a non-finite step after step 0 had its update "
                                             r"skipped\): mend the data"):
        with monkeypatch.context() as mp:
            mp.setattr(common, "make_optimizer", fused)
            common.train(toy_args(tmp_path / "data", steps=8, log_every=5), m3, bad_audio_in_step_4, items, cpu(),
                         method="toy")
    w = [load_file(common.find_checkpoint(str(tmp_path / r)) + "/trainable.safetensors") for r in ("fused", "cpu")]
    assert torch.isfinite(w[0]["lin.weight"]).all()
    assert all(torch.allclose(w[0][k], w[1][k], atol=1e-6) for k in w[0])


def test_log_lines_rates_are_those_since_the_line_before(tiny, tmp_path, capsys):
    """A metrics line's samples/s covers the steps since the line before (it was the run's mean
    since its start: a slowdown showed late and diluted); the closing line's is the whole run's."""
    items, m, calls = data.read_manifest(tiny["train"]), Toy(), []
    step = toy_step(m)

    def slower_from_step_4(batch):
        calls.append(1)
        if len(calls) > 3:
            time.sleep(0.3)                                   # 4 samples in 0.3 s: at most 13/s
        return step(batch)
    common.train(toy_args(tmp_path, log_every=3), m, slower_from_step_4, items, cpu(), method="toy")
    rows = [json.loads(x) for x in read(tmp_path / "metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[0]["samples_per_s"] > 40
    assert 9 < rows[1]["samples_per_s"] < 13.5                # (the run's mean: about 26/s)
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert 13.5 < float(closing.split(" samples/s")[0].split()[-1]) < 27


def test_a_plain_log_lines_rates_are_those_since_the_line_it_printed_before(tiny, tmp_path, capsys):
    """Without a terminal, a plain line is printed at most every 10 s: its rates cover the steps
    since the line before it (they were the last --log-every interval's only)."""
    items, m, calls = data.read_manifest(tiny["train"]), Toy(), []
    step = toy_step(m)
    slow_step_6 = lambda batch: (calls.append(1), len(calls) == 6 and time.sleep(0.5), step(batch))[2]
    common.train(toy_args(tmp_path, log_every=1), m, slow_step_6, items, cpu(), method="toy")
    rows = [json.loads(x) for x in read(tmp_path / "metrics.jsonl").splitlines()]
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in lines] == ["step 1/6", "step 6/6"]
    printed = float(lines[-1].split(" samples/s")[0].split()[-1])
    assert rows[-1]["samples_per_s"] < 9 and printed > 25            # 4 in 0.5 s; 20 in about 0.5 s


def test_a_non_finite_validation_figure_is_null_in_the_metrics_and_said(tiny, tmp_path, capsys):
    """A validation figure that is NaN (an odd validation clip) was written as NaN, which strict
    JSON parsers refuse: it is null, and said once on stderr."""
    items, m = data.read_manifest(tiny["train"]), Toy()
    common.train(toy_args(tmp_path, steps=2), m, toy_step(m), items, cpu(), method="toy",
                 valid_fn=lambda step: dict(loss_speech=float("nan"), acc=0.5))
    strict = lambda line: json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    valid = [r for r in map(strict, read(tmp_path / "metrics.jsonl").splitlines()) if r.get("split") == "valid"]
    assert valid == [dict(split="valid", step=2, loss_speech=None, acc=0.5)]
    assert "valid @2: loss_speech not finite (null in metrics.jsonl)" in capsys.readouterr().err
    with open(tmp_path / "metrics.jsonl", "a") as f:              # an earlier version's NaN: null once
        f.write('{"step": 1, "loss": NaN}\n')                     # the run is resumed
    common.train(toy_args(tmp_path, steps=3, resume=str(tmp_path)), m, toy_step(m), items, cpu(), method="toy")
    rows = list(map(strict, read(tmp_path / "metrics.jsonl").splitlines()))
    assert dict(step=1, loss=None) in rows and rows[-1]["step"] == 3
    assert common.json_safe(dict(a=float("inf"), b=1.0, c="x")) == dict(a=None, b=1.0, c="x")


def test_audio_of_absurd_sample_values_is_named(tmp_path):
    """Finite samples of 3e38 (a broken float WAV) passed the loader and made the spectrogram, and
    the loss, NaN (a validation's silently: its mean)."""
    import soundfile as sf
    sf.write(tmp_path / "loud.wav", np.full(16000, 3e38, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(data.DataError, match=r"m.jsonl:3: samples reach 3e\+38: not audio"):
        data.load_audio(str(tmp_path / "loud.wav"), where="m.jsonl:3")
    sf.write(tmp_path / "int16_scale.wav", np.full(16000, 3e4, np.float32), 16000, subtype="FLOAT")
    assert data.load_audio(str(tmp_path / "int16_scale.wav")).abs().max() == 3e4      # (kept: Whisper copes)


def test_a_checkpoint_is_on_disk_before_it_is_named(tmp_path, monkeypatch):
    """save_checkpoint fsyncs each file and the folder before the rename, and `latest` and the run
    directory before it is said saved: a power cut leaves the old checkpoint or the new one."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or replace(a, b))
    m = Toy()
    opt = torch.optim.AdamW(m.parameters())
    final = common.save_checkpoint(str(tmp_path), m, opt, 3, 0, 5, dict(method="toy"))
    tmp = next(p for what, p in events if what == "replace" and ".tmp" in p and "latest" not in p)
    at = events.index(("replace", tmp))
    synced_before = {os.path.basename(p) for what, p in events[:at] if what == "fsync"}
    assert {"trainable.safetensors", "train_state.pt", "meta.json", os.path.basename(tmp)} <= synced_before
    latest = next(p for what, p in events if what == "replace" and "latest.tmp" in p)
    assert events.index(("fsync", latest)) < events.index(("replace", latest)) < \
        events.index(("fsync", str(tmp_path)))
    assert read(tmp_path / "latest").strip() == os.path.basename(final) == "ckpt-3"


def test_data_wait_and_validation_time_are_measured_apart(tiny, tmp_path, monkeypatch, capsys):
    """Slow audio reading shows as the share of time spent waiting for data; validation time is
    left out of the throughput. (The step sleeps 0.2 s, so that reading the tiny clips stays a
    small share of it on a loaded machine too.)"""
    items = data.read_manifest(tiny["train"])
    load = data.load_audio

    def slow(*a, **k):
        time.sleep(0.1)                                   # 0.4 s a batch of 4
        return load(*a, **k)

    for sleepy in (False, True):
        if sleepy:
            monkeypatch.setattr(data, "load_audio", slow)
        m = Toy()
        step = toy_step(m)

        def slow_step(batch):                             # 0.2 s of "compute" a step
            time.sleep(0.2)
            return step(batch)

        def valid(step):
            time.sleep(1.0)
            return dict(x=1.0)
        out = tmp_path / str(sleepy)
        common.train(toy_args(out, steps=4, eval_every=2), m, slow_step, items, cpu(), valid_fn=valid,
                     method="toy")
        rows = [json.loads(x) for x in read(out / "metrics.jsonl").splitlines() if '"loss"' in x]
        wait, rate = rows[-1]["data_wait"], rows[-1]["samples_per_s"]
        closing = capsys.readouterr().out.strip().splitlines()[-1]
        assert "waiting for data" in closing
        if sleepy:
            assert wait > 0.45 and "more --workers?" in closing
        else:
            assert wait < 0.2 and "more --workers?" not in closing
            assert rate > 16 / 1.5  # 16 samples in about 0.85 s; with the 2 s of validation under 6/s


def test_default_llm_build_refuses_an_llm_that_cannot_copy(tmp_path):
    """Too few steps to learn the toy tasks: every seed is tried, then the build fails loudly
    instead of caching a broken LLM (the cached folder would be reused by every later run)."""
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="did not learn the toy tasks in 2 tries"):
            common._build_default_llm(str(tmp_path / "llm"), dict(common.DEFAULT_SIZES["llm"], steps=100),
                                      tries=2)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "llm").exists()


def test_built_in_llm_reads_stuttered_input_and_models_its_input(tiny):
    """The built-in LLM, built by the committed recipe (cached as a user's run would): it must read
    a word spread over two positions (as speech vectors spread a word), and be a language model of
    its input too (BLSP-KD's input KL distils its distributions there). The recipe before stutter
    and input loss repeated 0-5% of such inputs and had input NLL 6.8-9.6 nats."""
    llm, tok = common.load_llm(common.default_llm(), cpu())
    rng = random.Random(7)
    sents = [data.toy_sentence(rng) for _ in range(40)]
    stuttered = [text([j for k, i in enumerate(common.input_ids(tok, s)) for j in [i] * (1 + k % 2)])
                 for s in sents]
    with torch.no_grad():
        rep = common.respond(llm, tok, stuttered, data.REPEAT_INSTRUCTIONS[0], max_new_tokens=16)
        con = common.respond(llm, tok, stuttered, data.CONTINUE_INSTRUCTIONS[1], max_new_tokens=16)
        b, _ = common.prompt_pieces(tok, data.REPEAT_INSTRUCTIONS[0])
        sp = common.splice(llm.get_input_embeddings(),
                           [[text(b), text(common.input_ids(tok, s)[:1]),
                             text(common.input_ids(tok, s)[1:], loss=True)] for s in sents])
        nll, _ = common.lm_loss(llm, common.hidden_states(llm, sp), sp, reduction="mean")
    assert np.mean([r == s for r, s in zip(rep, sents)]) >= 0.9            # measured 0.975
    assert np.mean([c == data.toy_tasks(s)["continuation"] for c, s in zip(con, sents)]) >= 0.9
    assert float(nll) < 4.0                                                  # measured 3.06
    # so validation's content accuracy from the transcript is high: the position before each
    # content word predicts it (from the word itself, it would be near 0)
    items = data.read_manifest(tiny["valid"])                      # (toy sentences and their tasks)
    import blsp
    with torch.no_grad():
        res = common.alignment_eval(llm, tok, items, blsp.BLSPArgs(batch_size=8, max_new_tokens=1), cpu(),
                                    lambda b: [torch.zeros(2, llm.config.hidden_size) for _ in b["text"]],
                                    data.CONTINUE_INSTRUCTIONS[1])
    assert res["content_acc_text"] >= 0.9


def test_grad_ckpt_same_loss_and_gradients_fewer_saved_activations(tiny):
    """--grad-ckpt: the frozen LLM's pass with gradients gives the same loss and the same
    gradient to the speech vectors, while saving far fewer activations for the backward; and
    generation afterwards (no grad, KV cache) is unchanged."""
    tok = common.default_tokenizer()
    vecs = torch.randn(2, 9, 32)
    ids = [[5, 6, 7, 8], [9, 10, 11]]

    def run(grad_ckpt):
        llm, _ = common.load_llm(tiny["llm"], cpu(), grad_ckpt=grad_ckpt)
        v = vecs.clone().requires_grad_(True)
        samples = [[text([2, 3]), speech(v[b]), text(ids[b], loss=True)] for b in range(2)]
        sp = common.splice(llm.get_input_embeddings(), samples)
        with saved_for_backward() as saved:
            loss, _ = common.lm_loss(llm, common.hidden_states(llm, sp), sp)
        loss.backward()
        with torch.no_grad():
            out = common.respond(llm, tok, [speech(vecs[0])], data.REPEAT_INSTRUCTIONS[0], max_new_tokens=5)
        return float(loss.detach()), v.grad, sum(saved), out, llm
    l0, g0, s0, o0, _ = run(False)
    l1, g1, s1, o1, llm = run(True)
    assert l1 == l0 and torch.allclose(g1, g0, atol=1e-6) and g0.abs().sum() > 0
    assert s1 < s0 / 3                                    # measured: 62666 -> 12126 elements
    assert o1 == o0 and not any(m.training for m in llm.modules())


def test_grad_ckpt_with_partial_lora_same_gradients(tiny):
    """BLSP-KD's student pass sets the Partial-LoRA speech mask for the forward only; under
    --grad-ckpt the backward recomputes each layer, and must do so with that same mask: the
    loss and every LoRA gradient equal those without checkpointing."""
    vecs = torch.randn(2, 5, 32)

    def run(grad_ckpt):
        llm, _ = common.load_llm(tiny["llm"], cpu(), grad_ckpt=grad_ckpt)
        torch.manual_seed(0)
        ctx, lora = common.add_lora(llm, r=4, alpha=4, dropout=0.1, masked=True)
        for m in lora:
            nn.init.normal_(m.lora_B, std=0.1)            # a LoRA update that changes the output
        lora.train()
        samples = [[text([2, 3]), speech(vecs[b]), text([5 + b, 6, 7], loss=True)] for b in range(2)]
        sp = common.splice(llm.get_input_embeddings(), samples)
        torch.manual_seed(1)                              # the same LoRA dropout masks
        loss, _ = common.lm_loss(llm, blsp_kd.llm_pass(llm, sp, ctx, student=True), sp)
        assert ctx.rows is None                           # reset after the forward, as in training
        loss.backward()
        return float(loss.detach()), [m.lora_A.grad.clone() for m in lora]
    l0, g0 = run(False)
    l1, g1 = run(True)
    assert l1 == pytest.approx(l0, rel=1e-6) and sum(float(g.abs().sum()) for g in g0) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_lr_schedule():
    a = common.Args(lr=1.0, warmup=10, steps=110, schedule="linear", min_lr_ratio=0.1)
    assert common.lr_at(0, a) == pytest.approx(0.1) and common.lr_at(9, a) == pytest.approx(1.0)
    assert common.lr_at(60, a) == pytest.approx(0.55) and common.lr_at(110, a) == pytest.approx(0.1)
    a.schedule = "cosine"
    assert common.lr_at(60, a) == pytest.approx(0.55)


def test_all_reduce_sum_in_buckets(monkeypatch):
    """The gradients are summed over the processes in all_reduces of at most bucket_elems
    (neighbours concatenated), a larger tensor alone and in place: never one flat copy of all.
    A stand-in all_reduce doubles its tensor (2 processes holding the same)."""
    sent = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: sent.append(t) or t.mul_(2))
    ts = [torch.randn(n) for n in (3, 4, 20, 2, 2, 5)] + [torch.randn(2, 3), torch.randn(3, 4).T]
    want = [2 * t for t in ts]
    common.all_reduce_sum(ts, bucket_elems=8)
    assert all(torch.equal(t, w) for t, w in zip(ts, want))
    assert [t.numel() for t in sent] == [7, 20, 4, 5, 6, 12] and sent[1] is ts[2]
    assert sent[-1] is not ts[-1] and sent[-1].is_contiguous()     # (NCCL: contiguous tensors only)


def test_torchrun_two_processes_match_one(tiny, tmp_path):
    """2 gloo processes x batch 4 == 1 process x batch 4 x 2 accumulation steps: the same
    utterances per optimizer step (rank r takes batches r, r+2, ...), so the same losses."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
args = toy_args(sys.argv[1], batch_size=4, grad_accum=int(sys.argv[2]), steps=4)
device, rank, world = common.setup(args)
m = Toy(); m.drop.p = 0.0
common.train(args, m, toy_step(m), data.read_manifest({tiny['train']!r}), device, rank, world, method="toy")
""")
    r = run_python(script, tmp_path / "ddp", 1, torchrun=True)
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1000:]     # the workers' error first
    r = run_python(script, tmp_path / "one", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    l2, l1 = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(l2) == len(l1) == 4 and l1[-1] < l1[0]
    assert l2 == pytest.approx(l1, rel=1e-5)
    norms = lambda out: [r["grad_norm"] for r in map(json.loads, read(out / "metrics.jsonl").splitlines()) if "loss" in r]
    assert norms(tmp_path / "ddp") == pytest.approx(norms(tmp_path / "one"), rel=1e-5)   # (AdamW hides a scale)


def test_torchrun_processes_start_from_the_same_weights(tiny, tmp_path):
    """A trained part each process initialised differently (SSR's LoRA is built after stage 1,
    whose dropout left each process's RNG elsewhere) starts from process 0's weights, and the
    processes stay equal; dropout masks differ per process (seeded seed + rank)."""
    script = tmp_path / "init.py"
    script.write_text(f"""
import sys, torch, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
args = toy_args(sys.argv[1], batch_size=4, steps=2)
device, rank, world = common.setup(args)
m = Toy(); step = toy_step(m)
with torch.no_grad():
    m.lin.weight.add_(rank)                    # each process's own initial weights
masks = []
def fn(batch):
    masks.append(torch.rand(8))
    return step(batch)
common.train(args, m, fn, data.read_manifest({tiny['train']!r}), device, rank, world, method="toy")
torch.save(dict(w=m.lin.weight.detach(), masks=masks), sys.argv[1] + f"/rank{{rank}}.pt")
""")
    r = run_python(script, tmp_path / "run", torchrun=True)
    assert r.returncode == 0, r.stderr[:3000]
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{k}.pt") for k in (0, 1))
    torch.testing.assert_close(r0["w"], r1["w"])
    assert not torch.equal(r0["masks"][0], r1["masks"][0])


def test_torchrun_resume_gives_the_same_losses(tiny, tmp_path):
    """2 gloo processes, CUDA's path (fused AdamW, forced on the CPU: its first step crashed under
    torchrun), dropout on; a SIGTERM reaches rank 1 alone, in step 4 (a straggler: before, it left
    at once, rank 0's all_reduce failed and nothing was saved). Both finish step 4 and stop
    (common.StopFlags); rank 1 waits for rank 0's slow save (it used to exit first, and torchrun
    killed rank 0 mid-save). 2 new processes resume, each with its own RNG (each process's dropout
    differs; before, both took rank 0's): the same losses and weights as an uninterrupted run.
    The uninterrupted run saves after every step (--save-minutes, asked for by rank 0 through the
    all_reduce): all processes save together, and the saves leave the losses as they were."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import os, signal, sys, time, torch, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
out, mode = sys.argv[1], sys.argv[2]
args = toy_args(out, batch_size=4, steps=6, resume=out if mode == "resume" else None,
                save_minutes=1e-9 if mode == "full" else 0)
device, rank, world = common.setup(args)
make, save = common.make_optimizer, common.save_checkpoint
common.make_optimizer = lambda params, args, device, lr_scale=(): torch.optim.AdamW(
    [dict(params=g["params"], weight_decay=g["weight_decay"], lr_scale=g["lr_scale"])
     for g in make(params, args, device, lr_scale).param_groups], lr=args.lr, fused=True)
common.save_checkpoint = lambda *a, **k: (time.sleep(2 if mode == "stop" else 0), save(*a, **k))[1]
m = Toy(); m.drop.p = 0.3
step, calls = toy_step(m), []
def stopped_in_step_4(batch):
    calls.append(1)
    if mode == "stop" and len(calls) == 4 and rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    if mode == "full" and rank == 0 and len(calls) > 1:
        with open(out + "/seen.txt", "a") as f:
            f.write(open(out + "/latest").read().strip() + " ")
    return step(batch)
common.train(args, m, stopped_in_step_4, data.read_manifest({tiny['train']!r}), device, rank, world, method="toy")
if rank == 0:
    torch.save(m.lin.weight, out + "/weight.pt")
""")
    run = lambda out, mode: run_python(script, tmp_path / out, mode, torchrun=True)
    r = run("full", "full")
    assert r.returncode == 0, r.stderr[:3000]
    assert read(tmp_path / "full" / "seen.txt").split() == [f"ckpt-{k}" for k in range(1, 6)]
    assert sorted(os.listdir(tmp_path / "full")).count("ckpt-6") == 1 and "ckpt-6.1" not in os.listdir(tmp_path / "full")
    r = run("half", "stop")
    assert r.returncode != 0 and "interrupted (a signal to another process) at step 4" in r.stdout, \
        r.stdout[-2000:] + r.stderr[:2000]
    assert read(tmp_path / "half" / "latest").strip() == "ckpt-4"
    r = run("half", "resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[:3000]
    assert len(losses(tmp_path / "full")) == 6
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "half" / "weight.pt"),
                               torch.load(tmp_path / "full" / "weight.pt"))

def test_resume_on_another_number_of_processes_takes_up_the_epoch_where_it_was(tiny, tmp_path, capsys):
    """A run of 2 processes x --grad-accum 1, resumed on 1 process with --grad-accum 2, has the same
    batches in each step, and goes on from the batches the 2 processes had reached (before, the 1
    process took process 0's count of batches as its own and trained half of them again): the
    losses of a 1-process run of --grad-accum 2 throughout (dropout off: its draws differ)."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
args = toy_args(sys.argv[1], steps=3)
device, rank, world = common.setup(args)
m = Toy(); m.drop.p = 0.0
common.train(args, m, toy_step(m), data.read_manifest({tiny['train']!r}), device, rank, world, method="toy")
""")
    items = data.read_manifest(tiny["train"])
    full = Toy()
    full.drop.p = 0.0
    common.train(toy_args(tmp_path / "full", grad_accum=2), full, toy_step(full), items, cpu(), method="toy")
    r = run_python(script, tmp_path / "two", torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one = Toy()
    one.drop.p = 0.0
    capsys.readouterr()
    common.train(toy_args(tmp_path / "two", grad_accum=2, resume=str(tmp_path / "two")), one, toy_step(one),
                 items, cpu(), method="toy")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)
    assert "resumed on 1 process x --grad-accum 2 (the run: 2 x 1): the same batches in each step" in \
        capsys.readouterr().err
    torch.testing.assert_close(one.lin.weight, full.lin.weight)


def test_torchrun_resume_with_skip_bad_takes_each_process_own_data_position(tiny, tmp_path):
    """--skip-bad under torchrun: a process passes a batch of nothing but bad clips and draws the
    next, so the processes' data positions drift apart. Each process's own is saved and resumed
    (all resumed at rank 0's, and the others saw other batches than the uninterrupted run)."""
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    items = data.read_manifest(tiny["train"])
    for j, it in enumerate(items):              # batches of 2 in this order, a step's 2 neighbours:
        it["duration"] = 1 + 0.01 * j           # of the first 8 steps, rank 0's batch is bad audio
        if j < 32 and j % 4 < 2:
            it["audio"] = str(tmp_path / "bad.wav")
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({k: v for k, v in it.items() if k != "where"}) + "\n" for it in items))
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import os, signal, sys, torch, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
out, mode = sys.argv[1], sys.argv[2]
args = toy_args(out, batch_size=2, steps=6, skip_bad=True, resume=out if mode == "resume" else None)
device, rank, world = common.setup(args)
m = Toy(); m.drop.p = 0.0
step, calls = toy_step(m), []
def stopped_in_step_3(batch):
    calls.append(1)
    if mode == "stop" and len(calls) == 3 and rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(batch)
common.train(args, m, stopped_in_step_3, data.read_manifest({str(p)!r}), device, rank, world, method="toy")
""")
    run = lambda out, mode: run_python(script, tmp_path / out, mode, torchrun=True)
    assert run("full", "full").returncode == 0
    r = run("half", "stop")
    assert r.returncode != 0 and "at step 3" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    rngs = torch.load(tmp_path / "half" / "ckpt-3" / "train_state.pt", weights_only=False)["rng"]
    assert rngs[0]["position"] != rngs[1]["position"]                  # (they drifted apart here)
    r = run("half", "resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_torchrun_bad_data_met_by_one_process_keeps_the_steps_done(tiny, tmp_path):
    """2 gloo processes; rank 1's third batch is bad audio, while rank 0 waits in step 3's
    all_reduce: rank 1 saves step 2 alone (it used to exit with nothing saved since the last
    checkpoint), rank 0 says in one line that another process stopped, and 2 new processes resume
    the run to the uninterrupted run's losses and weights."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
out, mode = sys.argv[1], sys.argv[2]
args = toy_args(out, batch_size=4, steps=5, resume=out if mode == "resume" else None)
device, rank, world = common.setup(args)
m = Toy(); m.drop.p = 0.0      # (rank 0's dropout draws are not in a checkpoint rank 1 saved)
step, calls = toy_step(m), []
def bad_in_step_3(batch):
    calls.append(1)
    if mode == "bad" and len(calls) == 3 and rank == 1:
        raise data.DataError("m.jsonl:7: cannot read audio")
    return step(batch)
common.train(args, m, bad_in_step_3, data.read_manifest({tiny['train']!r}), device, rank, world, method="toy")
if rank == 0:
    torch.save(m.lin.weight, out + "/weight.pt")
""")
    run = lambda out, mode: run_python(script, tmp_path / out, mode, torchrun=True)
    assert run("full", "full").returncode == 0
    r = run("half", "bad")
    assert r.returncode != 0 and "m.jsonl:7: cannot read audio; step 2 is saved: mend the data" in r.stderr, \
        r.stderr[-3000:]
    assert "UserError: process 0: another process stopped in step 3 (" in r.stderr      # (not gloo's trace)
    assert read(tmp_path / "half" / "latest").strip() == "ckpt-2"
    rngs = torch.load(tmp_path / "half" / "ckpt-2" / "train_state.pt", weights_only=False)["rng"]
    assert rngs[0] is None and rngs[1] is not None
    r = run("half", "resume")
    assert r.returncode == 0 and "resumed from" in r.stdout and "saved by one process alone" in r.stdout, \
        r.stderr[-3000:]
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert len(losses(tmp_path / "full")) == 5
    torch.testing.assert_close(torch.load(tmp_path / "half" / "weight.pt"),
                               torch.load(tmp_path / "full" / "weight.pt"))


def test_torchrun_non_finite_stop_waits_for_the_checkpoint(tiny, tmp_path):
    """2 gloo processes, a NaN loss in step 3: process 1 leaves only once process 0's checkpoint is
    written (it left at once, and torchrun then stopped process 0 mid-save: SIGKILL after 30 s)."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import os, sys, time, torch, common, data
sys.path.insert(0, {HERE!r})
from test_all import Toy, toy_step, toy_args
out = sys.argv[1]
args = toy_args(out, batch_size=4, steps=5)
device, rank, world = common.setup(args)
save = common.save_checkpoint
common.save_checkpoint = lambda *a, **k: time.sleep(2) or save(*a, **k)       # a large checkpoint
m = Toy()
step, calls = toy_step(m), []
def nan_in_step_3(batch):
    calls.append(1)
    loss, n, lg = step(batch)
    return (loss * float("nan") if len(calls) == 3 and rank == 1 else loss), n, lg
try:
    common.train(args, m, nan_in_step_3, data.read_manifest({tiny['train']!r}), device, rank, world, method="toy")
except common.UserError:
    open(os.path.join(out, f"left{{rank}}"), "w").write(str(os.path.exists(os.path.join(out, "latest"))))
    raise
""")
    r = run_python(script, tmp_path / "run", torchrun=True)
    assert r.returncode != 0 and "non-finite loss or gradients in step 3 (loss nan" in r.stderr, r.stderr[-3000:]
    assert read(tmp_path / "run" / "left1") == "True" and read(tmp_path / "run" / "latest").strip() == "ckpt-3"


def test_a_run_resumed_before_its_first_checkpoint_is_not_refused_for_its_own_settings(tmp_path, monkeypatch,
                                                                                        capsys):
    """A run stopped before its first checkpoint (BLSP-KD while its continuations were generated, an
    error in step 1) resumes with its config.json's settings: those are not refused as if typed
    (--lora-r at stage 1, SLM's --prompt and --task, --min-lr-ratio with a constant schedule), and
    SSR takes its last command's --stage there too."""
    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached()
    monkeypatch.setattr(common, "load_encoder", reached)
    monkeypatch.setattr(slm, "build", reached)
    for main, method, cfg in ((blsp_kd.main, "blsp_kd", dict(stage=1, lora_r=16, lora_alpha=16.0)),
                              (slm.main, "slm", dict(prompt="auto", task="asr")),
                              (blsp.main, "blsp", dict(schedule="constant", min_lr_ratio=0.1)),
                              (ssr.main, "ssr", dict(stage="aligner"))):
        run = tmp_path / method
        os.makedirs(run)
        write(run / "config.json", json.dumps(dict(cfg, method=method)))
        with pytest.raises(Reached):
            main(["--resume", str(run), "--device", "cpu"])
    assert f"--resume {tmp_path / 'ssr'}: --stage aligner, the run's last command's" in capsys.readouterr().err


def test_stop_flags_are_read_after_the_same_step_everywhere():
    """Every process reads the summed flags of step k after step k + lag (0 on CPU, 2 on CUDA)."""
    for lag in (0, 2):
        f = common.StopFlags(cpu())
        f.lag, seen = lag, []
        for k, summed in enumerate([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]):       # flag raised in step 2
            f.record(torch.tensor([summed, 2.0 * (k == 3)]))              # a save asked for in step 3
            seen.append(f.poll())
        stops, saves = zip(*seen)
        assert stops.index(True) == 2 + lag and sum(stops) == 1
        assert saves.index(True) == 3 + lag and sum(saves) == 1

def test_torchrun_processes_exit_cleanly(tmp_path):
    """Left to Python's teardown, a gloo worker thread that frees its last all_reduce late aborts
    the process (SIGABRT; 3 of 18 runs of the test above). common.setup destroys
    the process group at exit, which joins those threads, and imports torch._dynamo before making
    the group (imported after, by the first optimizer, it keeps the group alive). Checked where it
    is certain: no gloo worker thread may be left after common's exit handler."""
    script = tmp_path / "bare.py"
    script.write_text("""
import atexit, os, sys, torch, common
def gloo_threads():
    return [t for t in os.listdir("/proc/self/task")
            if open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop"]
def check():                  # registered first, so it runs after common's own exit handler
    if gloo_threads():
        print("gloo worker threads still alive at exit", file=sys.stderr, flush=True)
        os._exit(3)
atexit.register(check)
device, rank, world = common.setup(common.Args(device="cpu"))
opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])      # imports torch._dynamo
x = torch.ones(1000)
for _ in range(4):
    torch.distributed.all_reduce(x)
assert float(x[0]) == world ** 4
assert gloo_threads()         # what check() looks for exists (named once they have run)
""")
    r = run_python(script, torchrun=True, timeout=120)
    assert r.returncode == 0, r.stderr[:2000]


# ============================================================================================
# BLSP

import blsp  # noqa: E402
import bench  # noqa: E402
from types import SimpleNamespace
import soundfile as sf
import blsp_kd
from common import speech, text
import itertools
import math
import ssr
import copy
import slm


def test_blsp_adapter_lengths_odd_and_even():
    ad = blsp.Adapter(8, 12, bottleneck=16)
    for L in (1, 2, 7, 8, 9, 16, 17, 33):
        out, lens = ad(torch.randn(1, L, 8), torch.tensor([L]))
        want = L
        for _ in range(3):
            want = (want - 1) // 2 + 1
        assert out.shape == (1, want, 12) and int(lens[0]) == want == int(ad.output_lengths(torch.tensor(L)))


def test_blsp_padding_never_changes_a_shorter_clip():
    torch.manual_seed(0)
    ad = blsp.Adapter(8, 12, bottleneck=16).eval()
    x = torch.randn(2, 40, 8)
    x[0, 23:] = 1e3                                    # garbage in the padding of clip 0
    out, lens = ad(x, torch.tensor([23, 40]))
    alone, alens = ad(x[:1, :23], torch.tensor([23]))
    n = int(alens[0])
    assert int(lens[0]) == n
    torch.testing.assert_close(out[0, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_blsp_loss_is_cross_entropy_on_continuation_only(tiny):
    llm, tok = common.load_llm(tiny["llm"], cpu())
    embed, eos = llm.get_input_embeddings(), common.eos_ids(llm, tok)[0]
    b, a = common.prompt_pieces(tok, blsp.CONTINUE_INSTRUCTION)
    torch.manual_seed(0)
    vecs = [torch.randn(5, llm.config.hidden_size), torch.randn(3, llm.config.hidden_size)]
    conts = [[10, 11, 12], [13, 14]]
    samples = [blsp.behaviour_sample(b, v, a, c, eos) for v, c in zip(vecs, conts)]
    loss, n, _ = blsp.behaviour_loss(llm, embed, samples)
    sp = common.splice(embed, samples)
    assert (sp.labels[sp.speech_mask] == -100).all()   # never a target at a speech position
    direct, count = 0.0, 0
    for v, c in zip(vecs, conts):                       # one sample at a time, by hand
        x = torch.cat([embed(torch.tensor(b)), v, embed(torch.tensor(a + c + [eos]))])[None]
        logp = llm(inputs_embeds=x).logits[0].log_softmax(-1)
        start = len(b) + len(v) + len(a)
        for j, t in enumerate(c + [eos]):
            direct += -logp[start + j - 1, t]
            count += 1
    assert n == count == 7
    torch.testing.assert_close(loss, direct, atol=1e-4, rtol=1e-5)


def test_compile_flag_compiles_the_adapter_in_place(tiny, tmp_path, monkeypatch):
    """--compile compiles the adapter in place: the training is unchanged (same losses) and the
    checkpoint keys stay those of the plain module. torch.compile's eager backend stands in for
    inductor here (no C++ compiler needed in CI); measured with inductor on the toy BLSP: the
    same losses, about 25 s of compile, then 393 against 370 samples/s."""
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **k: compiled.append(fn) or real(fn, **{**k, "backend": "eager"}))
    base = ["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"], "--valid",
            tiny["valid"], "--steps", "6", "--batch-size", "8", "--bottleneck", "16",
            "--continuation-tokens", "6", "--log-every", "1", "--max-new-tokens", "4"]
    blsp.main(base + ["--out", str(tmp_path / "plain")])
    assert not compiled
    blsp.main(base + ["--out", str(tmp_path / "compiled"), "--compile"])
    assert len(compiled) == 1 and getattr(compiled[0], "__self__", None).__class__ is blsp.Adapter
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    from safetensors.torch import load_file
    keys = lambda r: set(load_file(os.path.join(common.find_checkpoint(str(r)), "trainable.safetensors")))
    assert keys(tmp_path / "compiled") == keys(tmp_path / "plain")


def test_compiled_adapter_and_llm_layers_compile_once_for_every_length(monkeypatch):
    """Real-length batches bring a new length at every step: the compiled adapter and the compiled
    LLM layers (bench's blsp-compile-llm) must not compile again for each (dynamic shapes). Eager
    backend: dynamo's graphs and guards are the same as inductor's. (With inductor on this CPU:
    one compile each over clips of 3 to 20 s, then 0.03-0.15 s a step.)"""
    from torch._dynamo.utils import counters
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **k: real(fn, **{**k, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    dev, s = torch.device("cpu"), bench.SCALES["tiny"]
    enc, llm = bench.build_encoder(s["enc"], dev), bench.build_llm("tiny", 1000, dev)
    adapter, step = bench.blsp_method("blsp", enc, llm, s)
    common.compile_adapter(adapter, common.Args(compile=True))
    monkeypatch.setattr(common, "SHARED_PREFIX_MIN", 1 << 30)     # as bench's blsp-compile-llm
    bench.compile_llm_layers(llm)
    rng = random.Random(0)
    for d in (3.1, 5.55, 12.0, 7.02, 19.9):
        loss, _, _ = step(bench.make_batch([d, d - 0.7], 1000, rng, dev))
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]   # adapter, layer


def test_blsp_only_adapter_trains_and_main_runs(tiny, tmp_path, monkeypatch):
    """... and its training step never waits for the GPU (bench.HostSyncs counts none), with the
    tiny prompt's shared prefix run once, as a real chat template's is."""
    from safetensors.torch import load_file
    syncs = watch_host_syncs(monkeypatch)
    monkeypatch.setattr(common, "SHARED_PREFIX_MIN", 2)
    ran_once = []
    runs_once = common.prefix_runs_once
    monkeypatch.setattr(common, "prefix_runs_once", lambda llm, sp: ran_once.append(runs_once(llm, sp))
                        or ran_once[-1])
    out = tmp_path / "run"
    args = ["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"],
            "--valid", tiny["valid"], "--out", str(out), "--steps", "24", "--batch-size", "8",
            "--bottleneck", "16", "--continuation-tokens", "6", "--log-every", "1", "--lr", "3e-3",
            "--warmup", "2", "--max-new-tokens", "8"]
    before = {k: v.clone() for k, v in load_file(os.path.join(tiny["llm"], "model.safetensors")).items()}
    blsp.main(args)
    assert len(syncs) == 2 and all(s.total() == 0 for _, s in syncs), [s.report() for _, s in syncs]
    assert len(ran_once) >= 24 and ran_once.count(True) >= 24
    l = losses(out)
    assert np.mean(l[-4:]) < np.mean(l[:4])             # the loss goes down
    ck = common.find_checkpoint(str(out))
    saved = load_file(os.path.join(ck, "trainable.safetensors"))
    assert saved and all(k.split(".")[0] in ("convs", "bottleneck", "norm") for k in saved)
    after = load_file(os.path.join(tiny["llm"], "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    valid = [json.loads(x) for x in read(out / "metrics.jsonl").splitlines() if '"valid"' in x]
    assert valid and {"loss_speech", "loss_text", "repeat_wer", "content_acc"} <= set(valid[-1])
    # inference from the run directory
    blsp.main(["--ckpt", str(out), "--infer", data.read_manifest(tiny["valid"])[0]["audio"],
               "--max-new-tokens", "4"])


def test_a_bare_resume_continues_the_run_with_its_own_settings(tiny, tmp_path, monkeypatch, capsys):
    """`--resume DIR` alone, as README says: each flag not given again is the run's (config.json),
    not the default (it trained on to the default 800 steps, at another lr, on the toy corpus).
    Interrupted in training or while the LLM wrote its continuations (no checkpoint yet), the run
    gives the uninterrupted losses. A flag given again that differs is said; another method's run,
    or other models, are refused before any continuation is generated into it."""
    run = ["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"], "--valid", tiny["valid"],
           "--steps", "5", "--batch-size", "8", "--bottleneck", "16", "--continuation-tokens", "4",
           "--lr", "3e-3", "--warmup", "2", "--schedule", "cosine", "--log-every", "1", "--max-new-tokens", "2"]
    blsp.main(run + ["--out", str(tmp_path / "full")])
    loss, generate = blsp.behaviour_loss, common.generate_texts
    calls = []

    def interrupted_in_step_3(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*a)
    monkeypatch.setattr(blsp, "behaviour_loss", interrupted_in_step_3)
    with pytest.raises(SystemExit) as e:
        blsp.main(run + ["--out", str(tmp_path / "half")])
    assert e.value.code == 130 and read(tmp_path / "half" / "latest").strip() == "ckpt-2"
    monkeypatch.setattr(blsp, "behaviour_loss", loss)
    capsys.readouterr()
    blsp.main(["--resume", str(tmp_path / "half")])
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert "in place of" not in capsys.readouterr().err
    was = json.loads(read(tmp_path / "full" / "config.json"))
    now = json.loads(read(tmp_path / "half" / "config.json"))
    assert {k: v for k, v in now.items() if k not in ("out", "resume")} == \
        {k: v for k, v in was.items() if k not in ("out", "resume")}

    def interrupted_generating(llm, tok, prompts, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "generate_texts", interrupted_generating)
    with pytest.raises(SystemExit) as e:                # (one line, exit 130: common.guard)
        blsp.main(run + ["--out", str(tmp_path / "early")])
    assert e.value.code == 130
    monkeypatch.setattr(common, "generate_texts", generate)
    config = read(tmp_path / "early" / "config.json")
    with pytest.raises(SystemExit) as e:              # no checkpoint yet, and another method: refused
        blsp_kd.main(["--resume", str(tmp_path / "early")])
    assert e.value.code == 2 and read(tmp_path / "early" / "config.json") == config
    capsys.readouterr()
    blsp.main(["--resume", str(tmp_path / "early")])
    assert "no checkpoint yet" in capsys.readouterr().err
    assert losses(tmp_path / "early") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)

    blsp.main(["--resume", str(tmp_path / "full"), "--steps", "6"])         # extended: said
    assert "--steps 6 in place of the run's 5" in capsys.readouterr().err
    assert len(losses(tmp_path / "full")) == 6
    files = sorted(os.listdir(tmp_path / "full"))
    for script, flags, says in ((blsp_kd, [], f"--resume {tmp_path / 'full'}: a blsp run, not a blsp_kd one"),
                                (blsp, ["--bottleneck", "8"], "trained with --bottleneck 16, not --bottleneck 8")):
        with pytest.raises(SystemExit) as e:
            script.main(["--resume", str(tmp_path / "full")] + flags)
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "full")) == files                   # (nothing generated)
    with pytest.raises(SystemExit) as e:
        blsp.main(["--resume", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no such run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        blsp.main(run + ["--out", str(tmp_path / "full" / "config.json")])
    assert e.value.code == 2 and "cannot make this run directory" in capsys.readouterr().err


def test_blsp_main_precision_bf16_on_cpu(tiny, tmp_path, monkeypatch):
    """--precision bf16: the frozen encoder and LLM load in bf16, the adapter trains and is saved
    in fp32, and the loss goes down. The adapter's LayerNorm starts at the scale of the LLM's
    input embeddings (their root mean square): its speech vectors start as large as a token's."""
    from safetensors.torch import load_file
    monkeypatch.setattr(common, "BF16", None)
    start = []

    class Adapter(blsp.Adapter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            start.append(self.norm.weight.detach().clone())
    monkeypatch.setattr(blsp, "Adapter", Adapter)
    loaded, load_llm, load_encoder = [], common.load_llm, common.load_encoder
    monkeypatch.setattr(common, "load_llm", lambda *a, **k: loaded.append(load_llm(*a, **k)) or loaded[-1])
    monkeypatch.setattr(common, "load_encoder", lambda *a, **k: loaded.append(load_encoder(*a, **k)) or loaded[-1])
    out = tmp_path / "run"
    run = ["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"], "--valid", tiny["valid"],
           "--batch-size", "8", "--bottleneck", "16", "--continuation-tokens", "6", "--log-every", "1",
           "--lr", "3e-3", "--warmup", "2", "--max-new-tokens", "4", "--precision", "bf16"]
    blsp.main(run + ["--out", str(out), "--steps", "16"])
    enc, (llm, _) = loaded[0], loaded[1]
    assert next(enc.parameters()).dtype == llm.get_input_embeddings().weight.dtype == torch.bfloat16
    rms = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    torch.testing.assert_close(start[0], torch.full_like(start[0], float(rms)))
    l = losses(out)
    assert np.mean(l[-4:]) < np.mean(l[:4])
    saved = load_file(os.path.join(common.find_checkpoint(str(out)), "trainable.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    monkeypatch.chdir(tmp_path)                           # (where a default --out would go)
    blsp.main(run + ["--resume", str(out), "--steps", "17"])      # no --out: it continues in the run
    assert common.find_checkpoint(str(out)).endswith("ckpt-17") and not (tmp_path / "runs").exists()


def test_blsp_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "latest").write_text("ckpt-5")                      # another run's directory
    base = ["--llm", tiny["llm"], "--encoder", tiny["enc"], "--out", str(tmp_path / "r")]
    for extra, msg in ((["--train", str(tmp_path / "nope.jsonl")], "manifest not found"),
                       (["--llm", str(tmp_path / "none")], "--llm: not a folder"),
                       (["--encoder", str(tmp_path / "none")], "--encoder: not a folder"),
                       (["--resume", str(tmp_path)], "no checkpoint"),
                       (["--train", str(tmp_path)], "a directory, not a manifest"),
                       (["--stpes", "2"], "unrecognized arguments: --stpes 2 (--help lists the flags)"),
                       (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
                       (["--out", str(tmp_path / "old" / "latest" / "r")], "cannot make this run directory"),
                       (["--out", str(tmp_path / "old")], "--out " + str(tmp_path / "old") + " holds a run")):
        with pytest.raises(SystemExit) as e:
            blsp.main(base + ["--train", tiny["train"]] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert os.listdir(tmp_path / "old") == ["latest"]        # refused before writing continuations


def test_a_torchaudio_built_for_another_torch_is_one_line_before_any_work(tiny, tmp_path):
    """torchaudio 2.11.1 installed beside torch 2.11.0 fails in torch's library loader (OSError):
    said in one line before any model loads, with what to install."""
    fake = tmp_path / "site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "try:\n    raise OSError('libtorchaudio.so: undefined symbol: torch_exception_get_what')\n"
        "except OSError as e:\n    raise OSError('Could not load this library: libtorchaudio.so') from e\n")
    r = subprocess.run([sys.executable, "blsp.py", "--llm", tiny["llm"], "--encoder", tiny["enc"],
                        "--train", tiny["train"], "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, cwd=HERE, env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}:{HERE}"),
                       timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith(f"error: torchaudio does not load with torch {torch.__version__} "
                             f"(libtorchaudio.so: undefined symbol") and "requirements.txt" in err[0], err
    assert not (tmp_path / "run").exists()


def test_blsp_main_whisper_30s_is_kept_by_the_run(tiny, tmp_path, capsys, monkeypatch):
    """--whisper-30s trains with the released code's 30 s frames; the run keeps it: --ckpt loads
    the encoder that way, and --resume refuses the other way."""
    out, made, load = tmp_path / "run", [], common.load_encoder
    monkeypatch.setattr(common, "load_encoder", lambda *a, **kw: made.append(load(*a, **kw)) or made[-1])
    run = ["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"], "--valid", tiny["valid"],
           "--batch-size", "8", "--bottleneck", "16", "--continuation-tokens", "4", "--max-new-tokens", "3",
           "--steps", "2", "--whisper-30s"]
    blsp.main(run + ["--out", str(out)])
    assert json.loads(read(out / "config.json"))["whisper_30s"] is True and made[-1].pad_30s
    blsp.main(["--ckpt", str(out), "--infer", data.read_manifest(tiny["valid"])[0]["audio"],
               "--max-new-tokens", "2"])
    assert made[-1].pad_30s
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        blsp.main(run[:-1] + ["--no-whisper-30s", "--resume", str(out), "--steps", "3"])
    assert e.value.code == 2 and "the run was trained with --whisper-30s True" in capsys.readouterr().err


def test_a_run_whose_models_moved(tiny, tmp_path, capsys, monkeypatch):
    """A run keeps its model folders as given. Moved (another machine, another working directory):
    --ckpt names the missing folder and takes --llm / --encoder given in its place (a note on
    stderr), but not another shape; --resume refuses a flag that changes the run's models or
    shapes, naming it."""
    shutil.copytree(tiny["llm"], tmp_path / "llm")
    out = tmp_path / "run"
    run = ["--encoder", tiny["enc"], "--train", tiny["train"], "--valid", tiny["valid"], "--batch-size", "8",
           "--bottleneck", "16", "--continuation-tokens", "4", "--max-new-tokens", "3", "--steps", "2"]
    blsp.main(run + ["--llm", str(tmp_path / "llm"), "--out", str(out)])
    capsys.readouterr()
    for extra, msg in ((["--bottleneck", "8"], "the run was trained with --bottleneck 16, not --bottleneck 8"),
                       (["--llm", tiny["llm"]], f"the run was trained with --llm {tmp_path / 'llm'}, not --llm {tiny['llm']}")):
        with pytest.raises(SystemExit) as e:
            blsp.main(run + ["--llm", str(tmp_path / "llm"), "--resume", str(out), "--steps", "3"] + extra)
        assert e.value.code == 2 and f"--resume {out}: {msg}" in capsys.readouterr().err
    blsp.main(run + ["--llm", str(tmp_path / "llm") + "/", "--resume", str(out), "--steps", "3"])   # a shell's
    assert "--llm" not in capsys.readouterr().err                          # completion's "/": the same folder
    os.rename(tmp_path / "llm", tmp_path / "moved")
    ask = ["--ckpt", str(out), "--eval", tiny["valid"], "--max-valid", "2", "--max-new-tokens", "2"]
    with pytest.raises(SystemExit) as e:
        blsp.main(ask)
    assert e.value.code == 2 and (f"--ckpt {out}: the run's --llm {tmp_path / 'llm'} is not a folder here"
                                  in capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:                 # a shape given with --ckpt: the run's, or refused
        blsp.main(ask + ["--llm", str(tmp_path / "moved"), "--bottleneck", "8"])
    assert e.value.code == 2 and "its --bottleneck is 16, not 8 (the run fixes it)" in capsys.readouterr().err
    formats, pieces = [], common.prompt_pieces          # (a prompt format given: used, not the run's)
    monkeypatch.setattr(common, "prompt_pieces", lambda tok, ins, fmt="auto": formats.append(fmt) or pieces(tok, ins, fmt))
    blsp.main(ask + ["--llm", str(tmp_path / "moved"), "--bottleneck", "16", "--prompt", "blsp"])
    assert formats and set(formats) == {"blsp"}
    printed = capsys.readouterr()
    assert f"--ckpt {out}: --llm {tmp_path / 'moved'} in place of the run's {tmp_path / 'llm'}" in printed.err
    assert '"repeat_wer"' in printed.out


def test_a_run_resumed_into_another_out_and_evaluated_as_it_validated(tiny, tmp_path, capsys):
    """--resume A --out B goes on in B from A's continuations and metrics (it generated every
    continuation again: hours with a real LLM, and B's metrics.jsonl started empty); --ckpt
    --eval of the validation manifest takes the run's --continuation-tokens (it generated 64-token
    ones and reported another loss than the run's own validation)."""
    a, b = tmp_path / "a", tmp_path / "b"
    blsp.main(["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"], "--valid", tiny["valid"],
               "--steps", "2", "--batch-size", "8", "--bottleneck", "16", "--continuation-tokens", "4",
               "--max-new-tokens", "2", "--log-every", "1", "--out", str(a)])
    final = json.loads(capsys.readouterr().out.split("final: ")[1].splitlines()[0])
    blsp.main(["--resume", str(a), "--out", str(b), "--steps", "3"])
    assert "to generate" not in capsys.readouterr().out
    rows = [json.loads(l) for l in read(b / "metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3]
    blsp.main(["--ckpt", str(a), "--eval", tiny["valid"]])
    printed = capsys.readouterr().out
    assert "to generate" not in printed
    assert json.loads(printed[printed.index("{"):])["loss_speech"] == pytest.approx(final["loss_speech"], rel=1e-5)


def test_bad_numbers_are_one_line_errors_naming_the_flag():
    """Bounds of common.Args hold in every method, also where a method overrides the field's
    default (BLSP's --batch-size, SSR's --min-lr-ratio); a method's own bounds, and choices."""
    cases = [(blsp.BLSPArgs, ["--lr", "-1"], "--lr must be at least 0, not -1.0"),
             (blsp.BLSPArgs, ["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
             (blsp.BLSPArgs, ["--log-every", "0"], "--log-every must be at least 1, not 0"),
             (blsp.BLSPArgs, ["--max-seconds", "0"], "--max-seconds must be above 0, not 0.0"),
             (ssr.SSRArgs, ["--min-lr-ratio", "1.5"], "--min-lr-ratio must be at least 0 and at most 1, not 1.5"),
             (ssr.SSRArgs, ["--text-mix", "-0.5"], "--text-mix must be at least 0 and at most 1, not -0.5"),
             (blsp_kd.KDArgs, ["--stage", "3"], "--stage must be at least 1 and at most 2, not 3"),
             (blsp_kd.KDArgs, ["--temperature", "0"], "--temperature must be above 0, not 0.0"),
             (slm.SLMArgs, ["--stack", "0"], "--stack must be at least 1, not 0"),
             (blsp.BLSPArgs, ["--betas", "0.9"], "--betas must be two numbers in [0, 1) such as 0.9,0.999, not '0.9'"),
             (blsp.BLSPArgs, ["--betas", "0.9,1"], "--betas must be two numbers in [0, 1) such as 0.9,0.999, not '0.9,1'"),
             (blsp.BLSPArgs, ["--device", "tpu"], "--device must be cuda, cuda:N or cpu, not 'tpu'")]
    for cls, argv, msg in cases:
        with pytest.raises(common.UserError, match="^" + re.escape(msg) + "$"):
            common.parse_args(cls, argv)
    ok = common.parse_args(ssr.SSRArgs, ["--lr", "0", "--text-mix", "1", "--warmup", "0"])  # bounds are inclusive
    assert (ok.lr, ok.text_mix, ok.warmup, ok.schedule) == (0.0, 1.0, 0, "cosine")
    with pytest.raises(SystemExit):
        common.parse_args(ssr.SSRArgs, ["--schedule", "step"])     # SSR's own default, common's choices
    with pytest.raises(SystemExit):
        common.parse_args(blsp.BLSPArgs, ["--prompt", "llama"])
    assert common.parse_args(blsp.BLSPArgs, ["--betas", " 0.9, 0.95", "--device", "cuda:1"]).betas == " 0.9, 0.95"


# ============================================================================================
# bench.py cannot rot

def test_bench_tiny_runs(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--scale", "tiny", "--steps", "1",
                        "--vocab", "2000", "--profile", "--again", "--in-process", "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=HERE))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l.split()[0] for l in r.stdout.splitlines()]
    assert set(bench.VARIANTS) <= set(rows)
    assert "FAILED" not in r.stdout
    for line in ("faster than the 30 s recipe", "activation checkpointing of the LLM:", "BLSP-KD, kd:",
                 "BLSP-KD, kd-select:"):
        assert line in r.stdout
    found = json.loads(read(tmp_path / "rows.json"))["rows"]
    want = {"blsp": 0, "blsp-30s": 0, "kd": 0, "kd-full": 0, "ssr1": 1, "slm": 0}      # the syncs column
    assert {v: found[v]["host_syncs"] for v in want} == want
    prof = found["blsp"]["profile"]                                                 # --profile
    assert prof["total_ms"] > 0 and abs(sum(prof["kinds"].values()) - 1) < 1e-6
    assert prof["kinds"]["matmul"] > 0 and "profile blsp:" in r.stdout
    assert "again blsp:" in r.stdout                                                 # --again


def test_bench_runs_a_variant_in_its_own_process(tmp_path):
    """Without --in-process (the test above), each variant runs in a process of its own: its peak
    memory is its own."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--scale", "tiny", "--steps", "1",
                        "--variants", "blsp", "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=HERE))
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(read(tmp_path / "rows.json"))["rows"]["blsp"]
    assert row["samples_per_s"] > 0 and row["peak_gib"] > 0 and "blsp " in r.stdout


def test_bench_fused_rms_norm_is_the_same_function_and_whole_seconds_pad(monkeypatch):
    """blsp-fused-norm: the LLM with F.rms_norm computes HF's RMSNorm (fp32: to float rounding; bf16:
    within bf16 rounding), with the same input gradients; blsp-1s pads the audio to whole seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                                    # weights away from 1, as trained ones are
        for m in ref.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 0.03)):
        a = copy.deepcopy(ref).to(dtype)
        b = copy.deepcopy(a)
        assert bench.fuse_rms_norms(b) == 2 * 2 + 1          # two per layer and the final one
        x = torch.randn(2, 7, 64, dtype=dtype)
        outs = []
        for m in (a, b):
            xi = x.clone().requires_grad_(True)
            h = m.model(inputs_embeds=xi).last_hidden_state
            h.float().pow(2).sum().backward()
            outs.append((h.detach().float(), xi.grad.float()))
        (h1, g1), (h2, g2) = outs
        assert (h1 - h2).abs().max() <= tol * h1.abs().max(), dtype
        assert (g1 - g2).abs().max() <= tol * g1.abs().max(), dtype
        calls = []                                           # the patch took: b calls F.rms_norm
        monkeypatch.setattr(F, "rms_norm", lambda *a, f=F.rms_norm: calls.append(1) or f(*a))
        b.model(inputs_embeds=x), a.model(inputs_embeds=x)
        monkeypatch.undo()
        assert len(calls) == 5
    rng = random.Random(0)
    batch = bench.make_batch([2.5, 3.2], 1000, rng, torch.device("cpu"), whole_seconds=True)
    assert batch["wave"].shape[1] == 4 * 16000 and batch["wave_lens"].tolist() == [40000, 51200]
    assert bench.make_batch([2.5, 3.2], 1000, rng, torch.device("cpu"))["wave"].shape[1] == 51200


def test_bench_tiny_bf16_on_cpu_runs_the_other_methods():
    """--precision bf16 on a CPU through BLSP-KD (fp32 KL from bf16 logits; stage 2 with Partial
    LoRA), SSR stage 2 (LoRA under autocast) and SLM (T5 in bf16)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--scale", "tiny", "--steps", "1",
                        "--vocab", "2000", "--precision", "bf16", "--variants", "kd,kd2,ssr2,slm",
                        "--in-process"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=HERE))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "frozen models in bf16" in r.stdout and "FAILED" not in r.stdout
    assert {"kd", "kd2", "ssr2", "slm"} <= {l.split()[0] for l in r.stdout.splitlines() if l.strip()}


def without_attention(counter):
    """A FlopCounterMode's total but attention's own products (torch 2.15 counts SDPA's CPU kernel,
    2.11 does not; the model FLOPs leave them out)."""
    return counter.get_total_flops() - sum(v for op, v in counter.get_flop_counts()["Global"].items()
                                           if "scaled_dot_product" in str(op))


def test_model_flops_match_torch_flop_counter():
    """MFU's model FLOPs (common.matrices, llm_matrices): per token 2N for a frozen forward, 4N
    with the backward through frozen layers, 6N for trained weights (here LoRA's), and the output
    layer only at the rows whose logits are computed: what torch's FLOP counter counts for the
    matrix products (the model FLOPs leave attention's own products out, common.matrices:
    without_attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
    llm = common.freeze(LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa"))
    n_llm, n_head = common.llm_matrices(llm)
    assert n_head == 300 * 64 and n_llm == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)   # GQA: k, v 32 wide
    x, T, rows = torch.randn(2, 7, 64, requires_grad=True), 14, torch.tensor([[0, 1], [3, 6]])   # (b, t)
    with FlopCounterMode(display=False) as fwd:
        logits = common.logits_at(llm, llm.base_model(inputs_embeds=x).last_hidden_state, tuple(rows))
    assert without_attention(fwd) == 2 * n_llm * T + 2 * n_head * 2
    with FlopCounterMode(display=False) as both:
        common.logits_at(llm, llm.base_model(inputs_embeds=x).last_hidden_state, tuple(rows)).sum().backward()
    assert without_attention(both) == 4 * n_llm * T + 4 * n_head * 2
    _, lora = common.add_lora(llm, masked=False)
    n_lora, n_all = common.matrices(lora, trained=True), common.llm_matrices(llm)[0]
    assert n_lora > 0 and n_all == n_llm + n_lora
    with FlopCounterMode(display=False) as trained:
        llm.base_model(inputs_embeds=x).last_hidden_state.sum().backward()
    assert without_attention(trained) == 4 * n_llm * T + 6 * n_lora * T
    assert logits.shape == (2, 300)


def test_blsp_adapter_flops_at_each_layers_own_rate():
    """BLSP's adapter in the step's FLOPs: 6N with each layer at its output's rate (T/2, T/4, T/8,
    the bottleneck at T/8), what torch's FLOP counter counts for its convolutions and matrix
    products, forward and backward (it was counted 6N at every frame: 5.1% of a paper-scale step
    for a true 0.8%)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64))
    adapter, T = blsp.Adapter(24, 32, bottleneck=16), 64
    flops = blsp.step_flops(nn.Linear(1, 1, bias=False), adapter, llm)     # (an encoder of N = 1)
    frames = torch.randn(1, T, 24, requires_grad=True)
    with FlopCounterMode(display=False) as counted:
        adapter(frames, torch.tensor([T]))[0].sum().backward()
    assert flops(T, 0, 0) - 2 * T == counted.get_total_flops()


def test_speech_encoder_records_frames_for_the_flop_count():
    w = blsp_kd_tiny_whisper()
    from transformers import WhisperFeatureExtractor
    mel = WhisperFeatureExtractor(feature_size=80).mel_filters
    enc = common.freeze(common.SpeechEncoder(w.encoder, "whisper", mel))
    h, lens = enc(torch.randn(3, 16000), torch.tensor([16000, 8000, 12000]))
    assert h.shape[1] == 50 and lens.tolist() == [50, 25, 38]
    assert enc.frames == 50 + 25 + 38          # the real frames: padding is waste, not model FLOPs
    shallow = common.SpeechEncoder(w.encoder, "whisper", mel, layer=0)  # the layers above: not run
    assert common.matrices(shallow) == common.matrices(enc) - common.matrices(w.encoder.layers) > 0


def test_cuda_settings_turn_off_cudnn_attention():
    """cuDNN's SDPA plans every new length: seconds a step with real-length batches on an H100."""
    was = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        common.cuda_settings(torch.device("cuda"))        # no index: no set_device (runs on CPU too)
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was[0])
        torch.backends.cuda.matmul.allow_tf32 = was[1]


# ============================================================================================
# Merged method tests


# ============================================================================================
# blsp_kd (from test_blsp_kd.py)

# ----------------------------------------------------------------------------------------------
# tiny models

def blsp_kd_tiny_llm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tok = common.default_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, initializer_range=0.2)
    return common.freeze(LlamaForCausalLM(cfg)), tok


def blsp_kd_tiny_whisper():
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(1)
    cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return WhisperModel(cfg)


def blsp_kd_loss_args(**kw):
    a = dict(length_loss=True, response_kl=True, input_kl=True, response_ce=True, temperature=2.0,
             unfreeze_encoder=False)
    return SimpleNamespace(**dict(a, **kw))


# ----------------------------------------------------------------------------------------------
# CIF

def blsp_kd_cif_loop(alpha, h, n):
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


def blsp_kd_check_against_loop(alpha, lens, n, D=5):
    B, T = alpha.shape
    h = torch.randn(B, T, D, dtype=torch.float64)
    w = blsp_kd.cif_weights(alpha, n)
    assert w.shape == (B, int(n.max()), T)
    out = torch.bmm(w, h)
    for b in range(B):
        k = int(n[b])
        ref, ref_sums = blsp_kd_cif_loop(alpha[b, :lens[b]], h[b, :lens[b]], k)
        assert ref.shape[0] == k
        torch.testing.assert_close(out[b, :k], ref, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(w[b, :k].sum(-1), ref_sums, atol=1e-9, rtol=1e-9)
        assert (w[b, k:] == 0).all() and (w[b, :, lens[b]:] == 0).all()
        torch.testing.assert_close(w[b].sum(0), alpha[b])       # each frame's weight is spent


def test_blsp_kd_cif_closed_form_equals_loop_random_padded():
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
        blsp_kd_check_against_loop(scaled, lens, n)


def test_blsp_kd_cif_fires_in_the_last_frame():
    alpha = torch.tensor([[0.3, 0.3, 2.4], [0.5, 0.5, 1.0]], dtype=torch.float64)
    n = torch.tensor([3, 2])
    blsp_kd_check_against_loop(alpha, torch.tensor([3, 3]), n)
    w = blsp_kd.cif_weights(alpha, n)
    torch.testing.assert_close(w[0], torch.tensor([[0.3, 0.3, 0.4], [0, 0, 1.0], [0, 0, 1.0]],
                                                  dtype=torch.float64))
    # weights summing past N (float rounding of the rescaled sum, at most): the last token takes
    # the tail, so every frame's weight is still spent
    w = blsp_kd.cif_weights(torch.tensor([[0.6, 0.6, 0.6, 0.6]], dtype=torch.float64), torch.tensor([2]))
    torch.testing.assert_close(w[0], torch.tensor([[0.6, 0.4, 0, 0], [0, 0.2, 0.6, 0.6]], dtype=torch.float64))


def test_blsp_kd_cif_is_differentiable_in_alpha():
    torch.manual_seed(1)
    alpha = (torch.rand(2, 7, dtype=torch.float64) + 0.1).requires_grad_()
    n = torch.tensor([3, 2])
    torch.autograd.gradcheck(lambda a: blsp_kd.cif_weights(blsp_kd.rescale(a, n), n), (alpha,))


def test_blsp_kd_cformer_counts_and_padding_independence():
    torch.manual_seed(0)
    cf = blsp_kd.CFormer(8, 6, 1, 1, 2).eval()
    frames, lens = torch.randn(2, 20, 8), torch.tensor([20, 11])
    vecs, n, total = cf(frames, lens, torch.tensor([4, 2]))
    assert vecs.shape == (2, 4, 6) and n.tolist() == [4, 2]
    alone, _, _ = cf(frames[1:, :11], lens[1:], torch.tensor([2]))
    torch.testing.assert_close(vecs[1, :2], alone[0], atol=1e-5, rtol=1e-5)
    _, n_inf, total = cf(frames, lens)                            # inference: round(sum alpha)
    assert n_inf.tolist() == [max(1, round(float(t))) for t in total.detach()]


def test_blsp_kd_cformer_checkpointed_is_the_same_with_fewer_saved_tensors():
    """--grad-ckpt: the CFormer's layers keep their inputs only and run again in the backward
    (dropout on: the recompute draws the same masks); the same outputs and gradients."""
    torch.manual_seed(0)
    plain = blsp_kd.CFormer(8, 6, 2, 2, 2, dropout=0.1).train()
    ckpt = blsp_kd.CFormer(8, 6, 2, 2, 2, dropout=0.1, checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    frames, lens, n = torch.randn(2, 20, 8), torch.tensor([20, 11]), [4, 2]
    out = []
    for cf in (plain, ckpt):
        torch.manual_seed(1)
        with saved_for_backward() as saved:
            vecs, _, total = cf(frames, lens, n)
        loss = (vecs ** 2).sum() + total.sum()
        out.append((vecs, torch.autograd.grad(loss, list(cf.parameters())), sum(saved)))
    torch.testing.assert_close(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b)
    assert out[1][2] < out[0][2] / 2


# ----------------------------------------------------------------------------------------------
# KD losses against two separate, plain LLM calls

def test_blsp_kd_kd_losses_equal_direct_computation():
    llm, tok = blsp_kd_tiny_llm()
    before, after = common.prompt_pieces(tok, blsp_kd.CONTINUE_INSTRUCTION)
    torch.manual_seed(3)
    trs = [common.input_ids(tok, "the old fox sees the cat"), common.input_ids(tok, "the dog helps the king")]
    resps = [common.target_ids(tok, "then the cat sees the fox again") + [tok.eos_token_id],
             common.target_ids(tok, "then the king")]
    vecs = [torch.randn(len(t), 32) for t in trs]
    total, n = torch.tensor([7.5, 4.0]), torch.tensor([6, 3])
    pairs = [blsp_kd.kd_pair(before, after, t, v, r) for t, v, r in zip(trs, vecs, resps)]
    got, k, _ = blsp_kd.kd_losses(llm, None, *zip(*pairs), blsp_kd_loss_args(), total, n)

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
    assert got["length"].item() == pytest.approx((1.5 / 6 + 1.0 / 3) / 2, rel=1e-6)   # |sum a - N| / N
    assert min(rkl) >= 0 and got["input_kl"] > 1e-4                # non-trivial: can fail


def test_blsp_kd_kl_with_a_masked_teacher_logit_is_finite():
    """A teacher logit of -inf (a vocabulary entry masked out) has p_t = 0 and adds 0 log 0 = 0,
    not NaN; the rest as the formula sum_v p_t (log p_t - log p_s)."""
    t, s = torch.randn(3, 10), torch.randn(3, 10)
    t[:, 7] = -math.inf
    got = blsp_kd.kl(t, s, 2.0)
    assert torch.isfinite(got).all()
    keep = torch.arange(10) != 7                   # the slow way: the sum without the masked entry
    lt, ls = torch.log_softmax(t / 2, -1)[:, keep], torch.log_softmax(s / 2, -1)[:, keep]
    ref = (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(got, ref)


class FrameEncoder(nn.Module):
    """A stand-in speech encoder: clip i gives wave_lens[i] frames of width d (random)."""
    def __init__(self, d):
        super().__init__()
        self.dim = d

    def forward(self, wave, wave_lens):
        return torch.randn(len(wave_lens), int(wave_lens.max()), self.dim), wave_lens

    def output_lengths(self, wave_lens):
        return wave_lens


def test_speech_vector_counts_follow_the_adapters_length_rules():
    """BLSP: 3 convolutions of stride 2, L -> floor((L-1)/2)+1 each; SLM: ceil(L / stack). The
    vectors each clip gets are cut at those counts (a floor division dropped the last one)."""
    batch = dict(wave=torch.zeros(2, 1), wave_lens=torch.tensor([13, 20]))
    vecs = blsp.speech_vectors(FrameEncoder(8), blsp.Adapter(8, 6, bottleneck=4), batch)
    assert [len(v) for v in vecs] == [2, 3]                          # 13 -> 7 -> 4 -> 2; 20 -> 10 -> 5 -> 3
    ad = slm.Adapter(8, 6, torch.tensor(1.0), stack=4, width=8, layers=1, heads=2, ffn=16)
    assert [len(v) for v in slm.speech_vectors(FrameEncoder(8), ad, batch)] == [4, 5]


def test_slm_adapter_knows_the_order_of_its_frames():
    """Its layers alone would only permute their outputs with their inputs; the sinusoidal
    positions added after the stacking make the order of the stacked frames count."""
    torch.manual_seed(0)
    ad = slm.Adapter(8, 6, torch.tensor(1.0), stack=2, width=8, layers=1, heads=2, ffn=16, dropout=0.0).eval()
    frames = torch.randn(1, 6, 8)
    swapped = frames.view(1, 3, 2, 8).flip(1).reshape(1, 6, 8)       # the 3 stacked vectors reversed
    out, back = ad(frames, torch.tensor([6]))[0], ad(swapped, torch.tensor([6]))[0].flip(1)
    assert not torch.allclose(out, back, atol=1e-4)
    torch.testing.assert_close(slm.sinusoid(2, 4, "cpu")[1], torch.tensor([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]))


def test_masked_lora_drops_out_its_input_at_the_speech_rows():
    """Partial LoRA in training: m * B A dropout(x) alpha/r; dropout draws differ from call to
    call at the speech rows, the text rows are the base layer's exactly."""
    torch.manual_seed(0)
    ctx = common.LoRAContext(masked=True)
    lora = common.LoRALinear(nn.Linear(8, 8), 2, 2, 0.5, ctx).train()
    nn.init.normal_(lora.lora_B)
    ctx.rows = torch.tensor([1, 2])
    x = torch.randn(1, 4, 8)
    a, b = lora(x), lora(x)
    assert not torch.allclose(a[0, 1:3], b[0, 1:3]) and torch.equal(a[0, [0, 3]], lora.base(x)[0, [0, 3]])


def test_blsp_adapter_equals_the_paper_by_hand():
    """Conv1d(k5, s2) + GLU three times over the unpadded frames, then x + W2 GELU(W1 x), then
    LayerNorm whose gain starts at the LLM embeddings' RMS."""
    torch.manual_seed(0)
    ad = blsp.Adapter(8, 6, bottleneck=4, embed_rms=0.3)
    frames = torch.randn(1, 16, 8)
    x = frames.transpose(1, 2)
    for conv in ad.convs:
        x = F.glu(F.conv1d(x, conv.weight, conv.bias, stride=2, padding=2), dim=1)
    x = x.transpose(1, 2)
    x = x + ad.bottleneck[2](F.gelu(ad.bottleneck[0](x)))
    want = F.layer_norm(x, (6,)) * 0.3 + ad.norm.bias
    torch.testing.assert_close(ad(frames, torch.tensor([16]))[0], want)


def test_generate_runs_the_prompt_with_partial_lora_at_its_speech_rows(tiny):
    """BLSP-KD's inference: the prompt's speech positions get the LoRA update, its text and the new
    tokens do not."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    ctx, layers = common.add_lora(llm, r=2, alpha=2, dropout=0.0, masked=True)
    seen = []
    forward = common.LoRALinear.forward

    def watched(self, x):
        seen.append(None if self.ctx.rows is None else self.ctx.rows.tolist())
        return forward(self, x)
    emb, d = llm.get_input_embeddings(), llm.config.hidden_size
    sp = common.splice(emb, [[common.text([5, 6]), common.speech(torch.randn(3, d)), common.text([7])]], True)
    import unittest.mock
    with unittest.mock.patch.object(common.LoRALinear, "forward", watched), torch.no_grad():
        common.generate(llm, sp, [10 ** 6], 2, lora=ctx)
    first = seen[:len(layers)]                                       # the prompt's pass
    assert first == [sp.speech_rows.tolist()] * len(layers) and sp.speech_rows.tolist() == [2, 3, 4]
    assert all(r is None for r in seen[len(layers):]) and ctx.rows is None


def test_paper_hyperparameters_are_the_defaults():
    """What the papers fix (METHODS.md) is each script's default; the toy-scaled ones are not here."""
    kd = blsp_kd.KDArgs()
    assert (kd.temperature, kd.lora_r, kd.lora_alpha, kd.lora_dropout, kd.continuation_tokens) == (2.0, 16, 16.0, 0.05, 48)
    assert (kd.length_loss, kd.response_kl) == (True, True)
    assert ssr.SSRArgs().cos_weight == 5.0 and ssr.SSRArgs().blockwise is True
    assert (slm.SLMArgs().order, slm.SLMArgs().stack) == ("speech-first", 4)
    b = blsp.BLSPArgs()
    assert (b.continuation_tokens, b.bottleneck) == (64, 512)


def test_blsp_kd_cformer_equals_the_paper_step_by_step():
    """CFormer, slowly for one clip: alpha_t = sigmoid(h_t[D-1]) after the pre layers, alpha scaled
    to sum to N, token k = sum_t W[k,t] h_t[:D-1] integrated and fired in a loop, then Linear(D-1 ->
    D), the post layers and Linear(D -> d_llm)."""
    torch.manual_seed(0)
    cf = blsp_kd.CFormer(8, 6, pre_layers=1, post_layers=1, heads=2, ffn=16).eval()
    frames, N = torch.randn(1, 9, 8), 3
    got, n, total = cf(frames, torch.tensor([9]), [N])
    pad = torch.zeros(1, 9, dtype=torch.bool)
    h = cf.pre[0](frames, src_key_padding_mask=pad)[0]
    alpha = torch.sigmoid(h[:, 7]).detach()                          # h_t[D-1] (read as floats)
    alpha = alpha * N / alpha.sum()
    tokens, acc, k = torch.zeros(N, 7), 0.0, 0
    for t in range(9):                                               # integrate and fire
        a = float(alpha[t])
        while a > 1e-9:
            take = a if k == N - 1 else min(a, 1.0 - acc)
            tokens[k] += take * h[t, :7]                             # h_t[:D-1]
            acc, a = acc + take, a - take
            if acc >= 1.0 - 1e-9 and k < N - 1:
                k, acc = k + 1, 0.0
    want = cf.out(cf.post[0](cf.proj(tokens)[None], src_key_padding_mask=torch.zeros(1, N, dtype=torch.bool)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert n.tolist() == [N] and float(total.detach()) == pytest.approx(float(torch.sigmoid(h[:, 7]).detach().sum()), rel=1e-5)


def test_blsp_kd_eval_averages_each_kl_over_its_own_positions(monkeypatch):
    """Validation: the response KL is a mean over response positions, the input KL over transcript
    positions, across batches (two one-item batches with different lengths against the items alone)."""
    llm, tok = blsp_kd_tiny_llm()
    trs = [common.input_ids(tok, "the old fox sees the cat"), common.input_ids(tok, "the dog")]
    resps = [common.target_ids(tok, "then the cat"), common.target_ids(tok, "then the king helps the dog again")]
    torch.manual_seed(4)
    vecs = [torch.randn(len(t), 32) for t in trs]
    wave = dict(wave=torch.zeros(1, 1), wave_lens=torch.tensor([1]))
    monkeypatch.setattr(common, "batches", lambda items, args: [
        dict(wave, i=[i], transcript_ids=[trs[i]], response_ids=[resps[i]]) for i in range(2)])
    monkeypatch.setattr(blsp_kd, "speech_vectors", lambda enc, cf, b, n_true=None: (   # CIF's own
        [vecs[i] for i in b["i"]], torch.tensor([len(trs[i]) + 2 * (n_true is None) for i in b["i"]]), None))
    args = blsp_kd_loss_args(prompt="auto", batch_size=1)
    got = blsp_kd.kd_eval(None, None, llm, tok, None, [None, None], args, cpu())
    before, after = common.prompt_pieces(tok, blsp_kd.CONTINUE_INSTRUCTION)
    alone = [blsp_kd.kd_losses(llm, None, *zip(blsp_kd.kd_pair(before, after, t, v, r)), args)
             for t, v, r in zip(trs, vecs, resps)]
    k, n = [a[1] for a in alone], [len(t) for t in trs]
    assert k[0] != k[1] and n[0] != n[1] and k[0] / n[0] != k[1] / n[1]
    want_in = sum(float(a[0]["input_kl"]) * m for a, m in zip(alone, n)) / sum(n)
    want_resp = sum(float(a[0]["response_kl"]) * m for a, m in zip(alone, k)) / sum(k)
    assert got["input_kl"] == pytest.approx(want_in, rel=1e-5)
    assert got["response_kl"] == pytest.approx(want_resp, rel=1e-5)
    assert got["count_err"] == pytest.approx((2 / n[0] + 2 / n[1]) / 2)   # |N_pred - N| / N, 2 more each
    assert (got["tokens_pred"], got["tokens_true"]) == pytest.approx((sum(n) / 2 + 2, sum(n) / 2))

# ----------------------------------------------------------------------------------------------
# Partial LoRA

def test_blsp_kd_plora_teacher_and_text_positions_are_the_frozen_llm():
    llm, tok = blsp_kd_tiny_llm()
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
    assert ctx.enabled and ctx.rows is None                     # switches restored
    args = blsp_kd.KDArgs(stage=2, pre_layers=1, post_layers=1, heads=2, ffn=16)    # what stage 2
    _, _, ctx2 = blsp_kd.build(args, cpu(), types.SimpleNamespace(dim=16), blsp_kd_tiny_llm()[0])  # builds:
    assert ctx2.masked                                                                  # Partial LoRA


# ----------------------------------------------------------------------------------------------
# Gradients reach the trained parts only

def blsp_kd_toy_batch(tok, sentences, seed=0):
    rng = random.Random(seed)
    rows = []
    for s in sentences:
        wave, _ = data.synthesize(s, rng)
        cont = data.toy_tasks(s)["continuation"]
        rows.append(dict(wave=torch.from_numpy(wave), text=s, transcript_ids=common.input_ids(tok, s),
                         response_ids=common.target_ids(tok, cont) + [tok.eos_token_id]))
    return data.collate(rows)


@pytest.mark.parametrize("stage,unfreeze", [(1, False), (2, False), (2, True)])
def test_blsp_kd_only_trained_parts_get_gradients(stage, unfreeze):
    llm, tok = blsp_kd_tiny_llm()
    from transformers import WhisperFeatureExtractor
    w = blsp_kd_tiny_whisper()
    encoder = common.freeze(common.SpeechEncoder(w.encoder, "whisper",
                                                 WhisperFeatureExtractor(feature_size=80).mel_filters))
    args = blsp_kd_loss_args(unfreeze_encoder=unfreeze, stage=stage, pre_layers=1, post_layers=1, heads=2,
                     ffn=0, dropout=0.0, lora_r=4, lora_alpha=4.0, lora_dropout=0.0,
                     grad_ckpt=unfreeze)                          # (the CFormer recomputed)
    module, cformer, ctx = blsp_kd.build(args, torch.device("cpu"), encoder, llm)
    before, after = common.prompt_pieces(tok, blsp_kd.CONTINUE_INSTRUCTION)
    batch = blsp_kd_toy_batch(tok, ["the cat sees the dog", "the old king helps the small bird"])
    flops = blsp_kd.step_flops(encoder, cformer, module, llm, unfreeze)
    loss, k, logs = blsp_kd.kd_step(encoder, cformer, llm, ctx, before, after, batch, args, flops)
    (loss / k).backward()
    assert set(logs) == {"length", "response_kl", "input_kl", "response_ce", "tokens", "flops"}
    terms = sum(float(logs[t]) for t in ("length", "response_kl", "input_kl", "response_ce"))
    assert loss.item() == pytest.approx(terms * k, rel=1e-5)       # loss_sum = (sum of means) x k
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

def blsp_kd_write_manifest(folder, name, sentences, seed):
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
        for i, s in enumerate(sentences):
            wave, _ = data.synthesize(s, rng)
            sf.write(os.path.join(folder, name, f"{i}.wav"), wave, data.SAMPLE_RATE)
            f.write(json.dumps(dict(audio=f"{name}/{i}.wav", text=s, duration=len(wave) / 16000,
                                    **data.toy_tasks(s))) + "\n")
    return os.path.join(folder, f"{name}.jsonl")


def test_blsp_kd_transcript_without_a_word_is_named_or_skipped(tiny, monkeypatch):
    """A transcript of punctuation alone ("?!") asks CIF for 0 vectors: the KL divided by 0 (loss
    inf in step 1, count_err Infinity in metrics.jsonl). It is named by its line; --skip-bad leaves
    it out."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    items = [dict(text="the cat", where="m.jsonl:1"), dict(text=" ?! ", where="m.jsonl:2")]
    monkeypatch.setattr(common, "cached_answers", lambda *a, **k: (["a dog"] * len(a[3]), [True] * len(a[3])))
    with pytest.raises(data.DataError, match=r"^m.jsonl:2: the transcript ' \?! ' has no word"):
        blsp_kd.continuation_data(llm, tok, list(items), blsp_kd.KDArgs(), "unused", "train")
    kept = list(items)
    blsp_kd.continuation_data(llm, tok, kept, blsp_kd.KDArgs(skip_bad=True), "unused", "train")
    assert [it["where"] for it in kept] == ["m.jsonl:1"] and len(kept[0]["transcript_ids"]) > 0


def test_blsp_kd_response_ends_with_the_end_token_only_where_the_llm_ended(tiny, monkeypatch):
    """The teacher's response is the LLM's continuation + the end of its turn where generation
    ended there; one cut at --continuation-tokens gets no end (the LLM did not end it). A cache
    written without `ended`: ended where shorter than the limit."""
    llm, tok = common.load_llm(tiny["llm"], cpu())
    conts = ["then the cat", "the fox sees the cat", "the dog"]
    monkeypatch.setattr(common, "cached_answers", lambda *a, **k: (conts, [True, False, None]))
    items = [dict(text=t) for t in ("the cat", "the fox", "a dog")]
    args = blsp_kd.KDArgs(continuation_tokens=5)
    blsp_kd.continuation_data(llm, tok, items, args, "unused", "t")
    eos, ids = common.answer_end(llm, tok, args.prompt), [common.target_ids(tok, c) for c in conts]
    assert len(ids[1]) == 5 and len(ids[2]) < 5
    assert [list(it["response_ids"]) for it in items] == [ids[0] + [eos], ids[1], ids[2] + [eos]]
    assert list(items[1]["transcript_ids"]) == common.input_ids(tok, "the fox")
    assert type(items[0]["transcript_ids"]) is type(items[0]["response_ids"]) is array.array   # compact
    batch = data.collate([dict(it, wave=torch.zeros(800)) for it in items])         # a batch: lists
    assert batch["response_ids"] == [ids[0] + [eos], ids[1], ids[2] + [eos]]


def test_cached_ids_are_each_ids_read_back_by_a_resumed_run(tiny, tmp_path, monkeypatch):
    """common.cached_ids: the ids each_ids gives, kept in the run directory; a second call (a
    resumed run) reads them without tokenizing; other texts or the other role (as_input) are
    another file; a file cut short is made again; a process other than 0 does not write."""
    tok = common.load_llm(tiny["llm"], cpu())[1]
    texts = ["the cat sees the dog", "a", "", "the lazy tiger likes the old doctor"]
    want = [list(i) for i in common.each_ids(tok, texts)]
    got = common.cached_ids(tok, texts, str(tmp_path), "train")
    assert [list(a) for a in got] == want and all(isinstance(a, array.array) for a in got)
    (path,) = glob.glob(str(tmp_path / "ids-train-*.bin"))
    each = common.each_ids
    monkeypatch.setattr(common, "each_ids", lambda *a, **k: (_ for _ in ()).throw(AssertionError("tokenized")))
    assert [list(a) for a in common.cached_ids(tok, texts, str(tmp_path), "train")] == want
    os.makedirs(tmp_path / "b")                     # --resume A --out B (and --init): read, and copied
    assert [list(a) for a in common.cached_ids(tok, texts, str(tmp_path / "b"), "valid",
                                               reuse_dirs=[None, str(tmp_path)])] == want
    assert len(glob.glob(str(tmp_path / "b" / "ids-valid-*.bin"))) == 1
    monkeypatch.setattr(common, "each_ids", each)
    as_input = common.cached_ids(tok, texts, str(tmp_path), "train", as_input=True)
    assert [list(a) for a in as_input] == [list(i) for i in common.each_ids(tok, texts, as_input=True)]
    common.cached_ids(tok, texts[:3], str(tmp_path), "train")
    assert len(glob.glob(str(tmp_path / "ids-train-*.bin"))) == 3
    with open(path, "r+b") as f:                               # cut short (a full disk, say)
        f.truncate(os.path.getsize(path) - 4)
    assert [list(a) for a in common.cached_ids(tok, texts, str(tmp_path), "train")] == want
    raw = bytearray(read_bytes(path))                          # changed, its length kept: the CRC
    raw[-4:], raw[-8:-4] = raw[-8:-4], raw[-4:]                # (two ids swapped: it was read as it was)
    with open(path, "wb") as f:
        f.write(raw)
    assert common.read_ids(path, len(texts)) is None
    assert [list(a) for a in common.cached_ids(tok, texts, str(tmp_path), "train")] == want
    assert common.read_ids(path, len(texts)) is not None       # (written again)
    os.remove(path)
    monkeypatch.setenv("RANK", "1")
    assert [list(a) for a in common.cached_ids(tok, texts, str(tmp_path), "train")] == want
    assert not os.path.exists(path)


def test_compact_ids_take_a_fraction_of_the_memory():
    """Millions of manifest items each keep their token ids (BLSP-KD: transcript and response):
    as arrays of 4-byte ints they take a fraction of a list of int objects' memory."""
    import tracemalloc
    sizes = []
    for make in (list, data.compact):
        rng = random.Random(0)
        tracemalloc.start()
        kept = [make([rng.randrange(300, 150000) for _ in range(75)]) for _ in range(2000)]
        sizes.append(tracemalloc.get_traced_memory()[0] / len(kept))
        tracemalloc.stop()
    assert sizes[1] < sizes[0] / 5, sizes          # (measured: 3.1 KB -> 0.39 KB for 75 ids)


def test_blsp_kd_main_stage1_stage2_eval(tmp_path, capsys, monkeypatch):
    """Stage 1, stage 2 from it, eval; no training step waits for the GPU (bench.HostSyncs). The
    tiny prompt's shared prefix (3 tokens) runs once, as a real chat template's does."""
    syncs = watch_host_syncs(monkeypatch)
    monkeypatch.setattr(common, "SHARED_PREFIX_MIN", 2)
    ran_once = []
    runs_once = common.prefix_runs_once
    monkeypatch.setattr(common, "prefix_runs_once", lambda llm, sp: ran_once.append(runs_once(llm, sp))
                        or ran_once[-1])
    llm, tok = blsp_kd_tiny_llm()
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    blsp_kd_tiny_whisper().save_pretrained(tmp_path / "enc")
    rng = random.Random(0)
    train = blsp_kd_write_manifest(tmp_path, "train", [data.toy_sentence(rng) for _ in range(16)], 1)
    valid = blsp_kd_write_manifest(tmp_path, "valid", [data.toy_sentence(rng) for _ in range(3)], 2)
    common_args = ["--llm", str(tmp_path / "llm"), "--encoder", str(tmp_path / "enc"), "--train", train,
                   "--valid", valid, "--device", "cpu", "--batch-size", "8", "--log-every", "1",
                   "--pre-layers", "1", "--post-layers", "1", "--heads", "2", "--max-new-tokens", "6",
                   "--continuation-tokens", "6", "--warmup", "2"]
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    blsp_kd.main(common_args + ["--out", s1, "--steps", "24", "--lr", "3e-3"])
    assert json.loads(read(os.path.join(s1, "config.json")))["input_kl"] is True   # on with --llm
    rows = [json.loads(l) for l in read(os.path.join(s1, "metrics.jsonl")).splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("split") != "valid"]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4])
    valid_row = [r for r in rows if r.get("split") == "valid"][-1]
    for key in ("content_acc", "repeat_wer", "count_err", "response_kl", "input_kl", "tokens_pred"):
        assert key in valid_row

    assert len(syncs) == 2 and all(s.total() == 0 for _, s in syncs), [s.report() for _, s in syncs]
    syncs.clear()
    ran_once.clear()
    flags = dict(zip(common_args[::2], common_args[1::2]))       # the models come from --init
    stage2 = [x for k, v in flags.items() if k not in ("--llm", "--encoder", "--pre-layers", "--post-layers",
                                                       "--heads", "--continuation-tokens") for x in (k, v)]
    cfg = json.loads(read(os.path.join(s1, "config.json")))
    del cfg["whisper_30s"]                                      # (a stage-1 run from before the flag)
    write(os.path.join(s1, "config.json"), json.dumps(cfg))
    capsys.readouterr()
    blsp_kd.main(stage2 + ["--out", s2, "--steps", "3", "--stage", "2", "--init", s1, "--unfreeze-encoder",
                           "--temperature", "1"])
    assert "to generate" not in capsys.readouterr().out         # stage 1's continuations, copied
    for tag in ("train", "valid"):
        (a,), (b,) = (glob.glob(os.path.join(d, f"answers-{tag}-*.jsonl")) for d in (s1, s2))
        assert os.path.basename(a) == os.path.basename(b) and common.read_texts(a) == common.read_texts(b)
    cfg = json.loads(read(os.path.join(s2, "config.json")))
    assert (cfg["continuation_tokens"], cfg["prompt"], cfg["heads"]) == (6, "auto", 2)   # from --init
    assert cfg["whisper_30s"] is False and cfg["temperature"] == 1.0
    was = read(os.path.join(s1, "config.json"))                  # --init's loss terms count (its
    write(os.path.join(s1, "config.json"), json.dumps(dict(json.loads(was), response_ce=True, dropout=0.1)))  # CE:
    blsp_kd.main(stage2 + ["--out", str(tmp_path / "ce"), "--steps", "1", "--stage", "2", "--init", s1,  # not
                           "--no-length-loss", "--no-response-kl", "--no-input-kl"])          # "no loss left")
    cfg = json.loads(read(tmp_path / "ce" / "config.json"))
    assert (cfg["response_ce"], cfg["dropout"], cfg["temperature"], cfg["input_kl"]) == (True, 0.1, 2.0, False)
    write(os.path.join(s1, "config.json"), was)
    assert len(syncs) == 2 and all(s.total() == 0 for _, s in syncs), [s.report() for _, s in syncs]
    from safetensors.torch import load_file
    state = load_file(os.path.join(common.find_checkpoint(s2), "trainable.safetensors"))
    assert any(k.startswith("lora.") for k in state) and any(k.startswith("cformer.") for k in state)
    assert any(k.startswith("encoder.") for k in state)
    opt = torch.load(os.path.join(common.find_checkpoint(s2), "train_state.pt"), weights_only=False)["optimizer"]
    assert [g["lr_scale"] for g in opt["param_groups"]] == pytest.approx([1, 1, 0.1, 0.1])   # encoder: lr / 10
    first_row = json.loads(read(os.path.join(s2, "metrics.jsonl")).splitlines()[0])
    assert first_row["loss"] < losses[0]                        # starts from the stage-1 CFormer
    assert len(ran_once) >= 6 and all(ran_once)                # teacher, student (Partial LoRA), eval

    capsys.readouterr()
    blsp_kd.main(["--ckpt", s2, "--eval", valid, "--device", "cpu", "--max-new-tokens", "4",
                  "--infer", str(tmp_path / "valid" / "0.wav")])
    out = capsys.readouterr().out
    assert "to generate" not in out                         # --eval of the valid manifest: its answers
    res = json.loads(out[out.index("{"):])
    final = [json.loads(l) for l in read(os.path.join(s2, "metrics.jsonl")).splitlines()][-1]
    assert res["response_kl"] == pytest.approx(final["response_kl"], rel=1e-4)   # at the run's --temperature
    assert {"content_acc", "repeat_wer", "count_err", "response_kl", "input_kl"} <= set(res)

    s3 = str(tmp_path / "s3")        # a stage 2 of its own continuation length, resumed bare: its own,
    blsp_kd.main(stage2 + ["--out", s3, "--steps", "2", "--stage", "2", "--init", s1,   # not the --init
                           "--continuation-tokens", "4"])                                 # run's (6)
    blsp_kd.main(["--resume", s3, "--steps", "3"])
    assert json.loads(read(os.path.join(s3, "config.json")))["continuation_tokens"] == 4
    assert len(glob.glob(os.path.join(s3, "answers-train-*.jsonl"))) == 1 and read(os.path.join(s3, "metrics.jsonl")).count('"loss"') == 3
    os.rename(s1, s1 + "_moved")                     # a stage 2 resumed bare needs not its --init run
    blsp_kd.main(["--resume", s3, "--steps", "4"])
    os.rename(s1 + "_moved", s1)
    blsp_kd.main(stage2 + ["--out", str(tmp_path / "s4"), "--steps", "1", "--stage", "2", "--init", s3])  # a stage-2
    assert read(tmp_path / "s4" / "latest").strip() == "ckpt-1"                  # run as --init: goes on
    was = read(os.path.join(s1, "config.json"))                 # an unfinished stage 1 as --init: said
    write(os.path.join(s1, "config.json"), json.dumps(dict(json.loads(was), steps=30)))
    capsys.readouterr()
    blsp_kd.main(stage2 + ["--out", str(tmp_path / "s5"), "--steps", "1", "--stage", "2", "--init", s1])
    assert f"--init {s1}: an unfinished run (its checkpoint is of step 24 of 30)" in capsys.readouterr().err
    write(os.path.join(s1, "config.json"), was)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        blsp_kd.main(common_args + ["--out", str(tmp_path / "bad"), "--stage", "2"])
    assert e.value.code == 2 and "--init" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        blsp_kd.main(stage2 + ["--out", str(tmp_path / "bad"), "--stage", "2", "--init", s1, "--heads", "3"])
    assert e.value.code == 2 and "its --heads is 2, not 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                  # the default, given: checked all the same
        blsp_kd.main(stage2 + ["--out", str(tmp_path / "bad"), "--stage", "2", "--init", s1, "--heads", "4"])
    assert e.value.code == 2 and "its --heads is 2, not 4" in capsys.readouterr().err
    other = tmp_path / "other" / "ckpt-1"                 # another method's run
    other.mkdir(parents=True)
    (other / "meta.json").write_text(json.dumps(dict(method="blsp", model="x")))
    (tmp_path / "other" / "latest").write_text("ckpt-1")
    with pytest.raises(SystemExit) as e:
        blsp_kd.main(stage2 + ["--out", str(tmp_path / "bad"), "--stage", "2", "--init", str(tmp_path / "other")])
    assert e.value.code == 2 and "checkpoint of another method (blsp != blsp_kd)" in capsys.readouterr().err
    for script in (blsp, slm):                            # --ckpt of another method's run
        with pytest.raises(SystemExit) as e:
            script.main(["--ckpt", s1, "--infer", data.read_manifest(valid)[0]["audio"], "--device", "cpu"])
        assert e.value.code == 2 and "checkpoint of another method (blsp_kd != " in capsys.readouterr().err
    for extra, msg in ((["--unfreeze-encoder"], "--unfreeze-encoder is for stage 2"),
                       (["--encoder-lr", "1e-5"], "--encoder-lr is the lr of an unfrozen encoder"),
                       (["--no-length-loss", "--no-response-kl", "--no-input-kl"], "no loss term left"),
                       (["--heads", "5"], "--heads 5 does not divide the encoder width")):
        with pytest.raises(SystemExit) as e:
            blsp_kd.main(common_args + ["--out", str(tmp_path / "bad")] + extra)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")          # refused before generating into it
    blsp_kd.main(common_args + ["--out", str(tmp_path / "still"), "--steps", "1", "--lr", "0"])
    assert json.loads(read(tmp_path / "still" / "config.json"))["lr"] == 0      # not the stage's default


# ============================================================================================
# ssr (from test_ssr.py)

# ---------------------------------------------------------------------------------------------
# characters -> LLM tokens

def test_ssr_boundaries_word_level_tokenizer():
    tok = common.default_tokenizer()
    txt = "the red fox"
    enc = tok(" " + txt, return_offsets_mapping=True, add_special_tokens=False)
    frames = {p: 3 * p for p, c in enumerate(" " + txt) if c != " "}
    # the -> 'e' at 3, red -> 'd' at 7, fox -> 'x' at 11
    assert ssr.token_boundaries(enc.offset_mapping, frames, 100) == [9, 21, 33]


def ssr_bpe_tokenizer():
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


def test_ssr_boundaries_bpe_multichar_leading_space_punctuation():
    tok = ssr_bpe_tokenizer()
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


def test_bos_only_where_the_tokenizer_starts_a_text_with_it():
    """Llama-style tokenizers start a text with BOS, so the prompt (and SSR's stage 2) does too; a
    tokenizer that names a BOS but never adds it (SmolLM2, Qwen; this BPE) gets none."""
    word, bpe = common.default_tokenizer(), ssr_bpe_tokenizer()
    assert common.bos_ids(word) == [word.bos_token_id] and common.bos_ids(bpe) == []
    assert common.prompt_pieces(word, "say", "blsp")[0][:1] == [word.bos_token_id]
    assert bpe.bos_token_id not in common.prompt_pieces(bpe, "say", "blsp")[0]


def test_ssr_aligner_loss_counts_the_characters_of_clips_that_fit():
    """An utterance CTC cannot fit in its frames adds 0 to the loss (zero_infinity) and none of
    its characters to the count the loss is divided by."""
    logp = torch.randn(2, 6, len(common.CTC_CHARS)).log_softmax(-1)
    loss, n = ssr.aligner_loss(logp, torch.tensor([6, 6]), ["ab", "abcdefgh"])
    alone, n_alone = ssr.aligner_loss(logp[:1], torch.tensor([6]), ["ab"])
    assert n == n_alone == 2 and torch.allclose(loss, alone)
    assert ssr.fits(3, [1, 1]) and not ssr.fits(2, [1, 1]) and ssr.fits(2, [1, 2])   # a blank between repeats


def test_ssr_full_finetune_trains_the_llm_in_fp32():
    """--finetune full on CUDA: the LLM was loaded in bf16 (frozen); trained, it is fp32 (AdamW on
    bf16 weights rounds small updates away)."""
    llm = tiny_llama(common.default_tokenizer()).to(torch.bfloat16)
    ssr.stage2_module(ssr.SSRArgs(finetune="full"), llm)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in llm.parameters())


def test_input_ids_without_a_lone_word_marker_from_a_legacy_sentencepiece_normalizer():
    """A tokenizer whose normalizer prepends "▁" to any text (legacy SentencePiece tokenizer.json):
    " the red" would give a lone "▁" first, and SSR a vector for it. The input goes without its
    space there; SSR's offsets stay positions in " " + text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")        # "▁▁the": "▁", "▁the"
    tk.train_from_iterator(["the red fox", " a"], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert tok.convert_ids_to_tokens(tok(" the red", add_special_tokens=False).input_ids)[0] == "▁"
    assert common.space_before(tok) == "" and common.space_before(ssr_bpe_tokenizer()) == " "
    ids = common.input_ids(tok, "the red fox")
    assert tok.convert_ids_to_tokens(ids) == ["▁the", "▁red", "▁fox"]
    got, offsets = ssr.tokens_of(tok, "the red fox")
    frames = {p: 3 * p for p, c in enumerate(" the red fox") if c != " "}
    assert got == ids and ssr.token_boundaries(offsets, frames, 100) == [9, 21, 33]
    bpe = ssr_bpe_tokenizer()                             # a BPE: its own ids and offsets, as before
    enc = bpe(" the red", return_offsets_mapping=True, add_special_tokens=False)
    assert ssr.tokens_of(bpe, "the red") == (enc.input_ids, enc.offset_mapping)


def test_ssr_counts_the_transcripts_greedy_ctc_never_writes():
    """Capitals, punctuation, digits: SSR trains on the tokens as given, which greedy CTC (a-z, ')
    never writes at inference; the run warns with this count."""
    items = [dict(text="the red fox"), dict(text="The red fox."), dict(text="don't  stop"), dict(text="42 cats"),
             dict(text="über")]
    assert ssr.unspeakable(items) == 3


def test_ssr_boundaries_same_frame_past_end_and_too_short():
    offs = [(0, 2), (2, 4), (4, 6)]
    frames = {1: 5, 3: 5, 5: 6}                       # two tokens end in frame 5
    assert ssr.token_boundaries(offs, frames, 100) == [5, 6, 7]
    frames = {1: 8, 3: 9, 5: 12}                      # the last token lies past the 10 frames
    assert ssr.token_boundaries(offs, frames, 10) == [7, 8, 9]
    assert ssr.token_boundaries(offs, {}, 10) == [0, 1, 2]   # nothing aligned: 0, 1, 2
    assert ssr.token_boundaries(offs, frames, 2) is None     # 3 tokens cannot fit in 2 frames
    assert ssr.token_boundaries([], frames, 2) == []


def test_ssr_ctc_labels_greedy_and_oracle_frames():
    pos, ids = common.ctc_labels("Hi,  o ")
    assert [(" Hi,  o "[p].lower(), common.CTC_CHARS[i]) for p, i in zip(pos, ids)] == \
        [("h", "h"), ("i", "i"), (" ", " "), ("o", "o")]
    C = len(common.CTC_CHARS)
    path = ["<blank>", "h", "h", "<blank>", "i", " ", " ", "o", "<blank>"]
    logp = torch.full((len(path), C), -5.0)
    for t, c in enumerate(path):
        logp[t, common.CTC_CHARS.index(c)] = 0.0
    assert common.ctc_greedy(logp) == ("hi o", {1: 3, 2: 4, 4: 7})   # h lasts until i starts
    chars = [["a", 0.08, 0.13], ["b", 0.13, 0.14]]
    assert ssr.oracle_frames(chars, "ab", 0.02) == {1: 6, 2: 6}
    with pytest.raises(data.DataError):
        ssr.oracle_frames(chars, "ax", 0.02)


# ---------------------------------------------------------------------------------------------
# forced alignment against brute force

def ssr_brute_force(logp, targets):
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
def test_ssr_forced_align_equals_brute_force(targets):
    g = torch.Generator().manual_seed(len(targets))
    for _ in range(3):
        logp = torch.randn(6, 4, generator=g).log_softmax(-1)
        best, path = ssr_brute_force(logp, targets)
        for fn in (common.ctc_forced_align, common.viterbi_align):
            labels = fn(logp, targets)
            assert labels == path, fn.__name__
            assert abs(sum(float(logp[t, k]) for t, k in enumerate(labels)) - best) < 1e-5


def test_ssr_char_frames_from_forced_path():
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

def test_ssr_masks_against_hand_built():
    assert torch.equal(ssr.causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 1, 1, 0, 0, 0],     # segment 1 = frames 2..3 sees from boundary 1
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],     # after the last boundary: from boundary 3
                         [0, 0, 0, 1, 1, 1]]).bool()
    assert torch.equal(ssr.blockwise_mask([1, 3], 6), want)


@pytest.mark.parametrize("blockwise", [False, True])
def test_ssr_connector_one_vector_per_token_and_mask_used(blockwise):
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


def ssr_connector_slow(con, frames, bnds):
    """Every layer at every frame, one utterance at a time, then the boundary frames."""
    x, T, out = con.proj(frames), frames.shape[1], []
    for i, b in enumerate(bnds):
        xi, m = x[i:i + 1], (ssr.blockwise_mask(b, T) if con.blockwise else ssr.causal_mask(T))[None]
        for blk in con.blocks:
            xi = blk(xi, m)
        out.append(xi[0, b])
    return out


@pytest.mark.parametrize("blockwise,checkpoint", [(False, False), (True, False), (True, True)])
def test_ssr_connector_last_layer_at_boundaries_equals_all_frames(blockwise, checkpoint):
    """... also with --grad-ckpt (each layer recomputed in the backward, keeping its input only)."""
    torch.manual_seed(0)
    con = ssr.Connector(12, 8, layers=3, heads=2, dropout=0.0, blockwise=blockwise, checkpoint=checkpoint)
    frames, bnds = torch.randn(3, 9, 12), [[1, 3, 6], [0, 4], []]
    saved = {}
    for on in (not checkpoint, checkpoint):                # (the run compared comes last)
        con.checkpoint = on
        with saved_for_backward() as saved[on]:
            got = con(frames, bnds)
    assert sum(saved[True]) < sum(saved[False]) / 4        # the layers keep their inputs only
    want = ssr_connector_slow(con, frames, bnds)
    assert [tuple(z.shape) for z in got] == [(3, 8), (2, 8), (0, 8)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    grads = [torch.autograd.grad(sum((z * z.detach().sign()).sum() for z in out), list(con.parameters()))
             for out in (got, want)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_ssr_distill_loss_equals_direct():
    torch.manual_seed(0)
    z, e = torch.randn(7, 5), torch.randn(7, 5)
    loss, n = ssr.distill_loss(z, e, 5.0)
    direct = 0.0
    for i in range(7):
        mse = sum(float(z[i, d] - e[i, d]) ** 2 for d in range(5))
        cos = float(z[i] @ e[i]) / (float(z[i].norm()) * float(e[i].norm()))
        direct += mse + 5.0 * (1 - cos)
    assert n == 7 and abs(float(loss) / n - direct / 7) < 1e-4


def test_ssr_ntp_splice_labels():
    embed = torch.nn.Embedding(20, 4)
    sp = ssr.ntp_splice(embed, [common.speech(torch.randn(3, 4)), common.text([5, 6])],
                        [[7, 8, 9], [5, 6]], [1], 2)
    assert sp.labels.tolist() == [[-100, 7, 8, 9, 2], [-100, 5, 6, 2, -100]]
    assert sp.speech_mask[0, 1:4].all() and not sp.speech_mask[1].any()


# ---------------------------------------------------------------------------------------------
# end to end on ssr_tiny models

@pytest.fixture(scope="module")
def ssr_tiny(tmp_path_factory):
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


def ssr_base_args(t, out):
    return ["--llm", str(t / "llm"), "--encoder", str(t / "enc"), "--train", str(t / "m.jsonl"),
            "--valid", str(t / "m.jsonl"), "--out", str(out), "--batch-size", "3", "--device", "cpu",
            "--max-new-tokens", "3", "--aligner-layers", "1", "--layers", "1", "--heads", "2",
            "--log-every", "1"]


def test_ssr_text_mix_is_the_share_of_transcript_batches(ssr_tiny, tmp_path, monkeypatch, capsys):
    """--text-mix: the fraction of stage-2 training batches that are the transcripts' ids (the
    LLM's own text), the others SSR vectors: 1, all of them. --ckpt then evaluates in the run's
    prompt format (--eval once took the default), or in one given on the command line."""
    trained, loss = [], ssr.stage2_loss

    def spy(*a, **k):
        if torch.is_grad_enabled():                     # (llm_eval's passes run without gradient)
            trained.append(a[5] if len(a) > 5 else k.get("text_only", False))
        return loss(*a, **k)
    monkeypatch.setattr(ssr, "stage2_loss", spy)
    ssr.main(ssr_base_args(ssr_tiny, tmp_path / "run") + ["--aligner-steps", "1", "--steps", "1",
                                                          "--stage2-steps", "4", "--text-mix", "1",
                                                          "--max-valid", "2", "--prompt", "blsp"])
    assert trained == [True] * 4
    formats, pieces = [], common.prompt_pieces
    monkeypatch.setattr(common, "prompt_pieces", lambda tok, ins, fmt="auto": formats.append(fmt) or pieces(tok, ins, fmt))
    for given, want in (([], "blsp"), (["--prompt", "auto"], "auto")):
        formats.clear()
        ssr.main(["--ckpt", str(tmp_path / "run"), "--eval", str(ssr_tiny / "m.jsonl"), "--max-valid", "2",
                  "--max-new-tokens", "2", "--device", "cpu"] + given)
        assert formats and set(formats) == {want}
    # --eval where a batch holds only a clip too short for its tokens (stage 2's loss of nothing
    # looked for a trained weight: StopIteration), and `"chars": null` (as absent: no oracle row)
    import soundfile as sf
    sf.write(tmp_path / "short.wav", np.random.RandomState(0).randn(1000).astype(np.float32) * 0.1, 16000)
    first = data.read_manifest(str(ssr_tiny / "m.jsonl"))[0]
    write(tmp_path / "e.jsonl", "".join(json.dumps(r) + "\n" for r in (
        dict(audio=str(tmp_path / "short.wav"), text=first["text"], chars=None),
        dict(audio=first["audio"], text=first["text"], chars=None, duration=None, continuation=" "))))
    capsys.readouterr()
    ssr.main(["--ckpt", str(tmp_path / "run"), "--eval", str(tmp_path / "e.jsonl"), "--batch-size", "1",
              "--max-new-tokens", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.rindex("\n{") + 1:])
    assert "matched_oracle" not in res and res["matched_forced"] == 0.5 and res["wer_forced"] >= 0.5


def test_ssr_aligner_cer_compares_with_what_ctc_can_emit(ssr_tiny, tmp_path, monkeypatch):
    """Capitals and punctuation in the transcript are not errors of a CTC over lower-case letters."""
    items = data.read_manifest(str(ssr_tiny / "m.jsonl"))[:2]
    for it in items:
        it["text"] = it["text"].capitalize() + "!"

    def perfect(m, batch):                     # log-probs whose greedy path spells each target
        paths = [[k for c in common.ctc_labels(t)[1] for k in (c, ssr.BLANK)] for t in batch["text"]]
        T = max(map(len, paths))
        logp = torch.full((len(paths), T, len(common.CTC_CHARS)), -10.0)
        for i, p in enumerate(paths):
            logp[i, torch.arange(T), (p + [ssr.BLANK] * T)[:T]] = 0.0
        return None, torch.tensor([T] * len(paths)), logp
    monkeypatch.setattr(ssr, "encode", perfect)
    args = ssr.SSRArgs(batch_size=2)
    assert ssr.aligner_cer(None, items, args, cpu()) == 0.0

def test_ssr_pretrained_ctc_head_only_over_the_last_layer(ssr_tiny):
    """The encoder folder's CTC head reads the last layer's frames: another --encoder-layer starts
    the aligner afresh (and so keeps the 'no trained aligner' warning)."""
    llm, tok = common.load_llm(str(ssr_tiny / "llm"), cpu())
    args = ssr.SSRArgs(aligner_layers=1, layers=1, heads=2, encoder=str(ssr_tiny / "enc"))
    for layer, pretrained in ((-1, True), (1, True), (0, False)):
        m = ssr.build(args, common.load_encoder(args.encoder, cpu(), layer), llm, tok, cpu())
        assert m.aligner.pretrained is pretrained, layer


def test_ssr_stage1_distils_into_the_input_embeddings_and_reads_out_by_cosine(ssr_tiny):
    """Stage 1's targets are the rows of the LLM's *input* embedding table (untied here from its
    output layer); the readout is the nearest row by cosine, not by dot product."""
    args = ssr.SSRArgs(aligner_layers=1, layers=1, heads=2, encoder=str(ssr_tiny / "enc"))
    llm, tok = common.load_llm(str(ssr_tiny / "llm"), cpu())
    m = ssr.build(args, common.load_encoder(args.encoder, cpu()), llm, tok, cpu())
    m.connector.eval()
    items = data.read_manifest(str(ssr_tiny / "m.jsonl"))[:2]
    batch = data.collate([dict(it, wave=data.load_audio(it["audio"])) for it in items])
    vecs, ids, _, _ = ssr.ssr_vectors(m, batch, "oracle")
    E = llm.get_input_embeddings().weight
    assert not torch.equal(E, llm.get_output_embeddings().weight) and len(vecs) == 2
    want = ssr.distill_loss(torch.cat(vecs).float(), E[torch.tensor([i for x in ids for i in x])].float(), 5.0)
    got = ssr.stage1_loss(m, batch, "oracle", 5.0)
    assert got[1] == want[1] == sum(map(len, ids)) and float(got[0].detach()) == pytest.approx(float(want[0].detach()), rel=1e-6)
    torch.manual_seed(0)
    z = torch.randn(4, E.shape[1]) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])
    E2 = torch.randn(20, E.shape[1]) * torch.rand(20, 1) * 5     # rows of unequal norms: dot != cos
    slow = [max(range(20), key=lambda v: float(F.cosine_similarity(z[i], E2[v], dim=0))) for i in range(4)]
    assert ssr.readout(z, E2).tolist() == slow != (z @ E2.T).argmax(-1).tolist()


def test_ssr_stage_losses_of_a_batch_whose_every_clip_is_skipped(ssr_tiny):
    """Tokens that cannot fit in their frames skip the clip; a batch of such clips gives a zero
    loss that backward takes and no tokens (stage 2 crashed in splice before)."""
    args = ssr.SSRArgs(aligner_layers=1, layers=1, heads=2, encoder=str(ssr_tiny / "enc"))
    llm, tok = common.load_llm(str(ssr_tiny / "llm"), cpu())
    m = ssr.build(args, common.load_encoder(args.encoder, cpu()), llm, tok, cpu())
    common.add_lora(llm, masked=False)
    item = data.read_manifest(str(ssr_tiny / "m.jsonl"))[0]
    batch = data.collate([dict(item, wave=data.load_audio(item["audio"])[:1600], text="a b c " * 40)])
    loss, n = ssr.stage1_loss(m, batch, "forced", 5.0)
    loss.backward()
    assert (loss.item(), n) == (0.0, 0) and m.connector.proj.weight.grad is not None
    loss, n, sp = ssr.stage2_loss(m, batch, "forced", common.bos_ids(tok), tok.eos_token_id)
    loss.backward()
    assert (loss.item(), n, sp) == (0.0, 0, None)
    loss, n, sp = ssr.stage2_loss(m, batch, "forced", common.bos_ids(tok), tok.eos_token_id, text_only=True)
    assert n == 121 and sp.n_tokens == 122 and loss.item() > 0    # 120 words + EOS; BOS too


def test_ssr_main_end_to_end(ssr_tiny, tmp_path, capsys, monkeypatch):
    """All stages, inference, eval. A step waits for the GPU once: the aligner's log-probs go to
    the host for the forced alignment (bench.HostSyncs); the aligner's own step never."""
    out = tmp_path / "run"
    syncs = watch_host_syncs(monkeypatch)
    ssr.main(ssr_base_args(ssr_tiny, out) + ["--aligner-steps", "2", "--steps", "3", "--stage2-steps", "2",
                                     "--text-mix", "0.5"])
    assert [m for m, _ in syncs] == ["ssr-aligner"] * 2 + ["ssr-stage1"] * 2 + ["ssr-stage2"] * 2
    for m, s in syncs:                                   # (stage 2: none in a text-only batch)
        assert s.total() == {"ssr-aligner": 0, "ssr-stage1": 1}.get(m, min(s.total(), 1)), s.report()
        assert all(what == "cpu" and "encode" in where for what, where in s.found), s.report()
    for stage in ("aligner", "stage1", "stage2"):
        assert os.path.isfile(out / stage / "latest")
    l1 = losses(out / "stage1")
    assert l1[-1] < 0.8 * l1[0]                           # 21.6 -> 11.2: stage 1 learns in 3 steps
    printed = capsys.readouterr().out
    assert "stage 2 text_loss" in printed and "CTC (no transcript)" in printed
    final = json.loads(printed.split("final: ")[-1].splitlines()[0])
    assert 0 <= final["acc_oracle"] <= 1 and "cos_greedy" in final and "text_loss" in final
    ssr.main(["--ckpt", str(out), "--infer", str(ssr_tiny / "wav" / "0.wav"), "--eval", str(ssr_tiny / "m.jsonl"),
              "--max-new-tokens", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "nearest-token readout" in printed and '"cos_forced"' in printed and "matched" in printed
    assert '"speech_loss"' in printed and '"repeat_wer"' in printed         # stage 2's LLM, measured
    for ckpt, msg in ((out / "stage1", f"one stage of an SSR run: --ckpt takes the run's directory, {out}"),
                      (tmp_path / "nope", "no such run directory")):
        with pytest.raises(SystemExit) as e:
            ssr.main(["--ckpt", str(ckpt), "--eval", str(ssr_tiny / "m.jsonl"), "--device", "cpu"])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                 # stage 2 without a stage-1 checkpoint
        ssr.main(ssr_base_args(ssr_tiny, tmp_path / "empty") + ["--stage", "2"])
    assert e.value.code == 2


def test_ssr_stages_one_at_a_time(ssr_tiny, tmp_path, capsys, monkeypatch):
    """--stage aligner, then 1, then 2, each its own command: each trains its stage only, from the
    ones before (--stage aligner once ended in "no checkpoint" for stage 1, exit 2), with the run's
    settings for the flags it is not given (it took the defaults, wrote them in the run's
    config.json, and a bare --resume then trained the aligner on to the default --aligner-steps)."""
    out, base = tmp_path / "run", ssr_base_args(ssr_tiny, tmp_path / "run")
    seeds, setup = [], common.setup                # (what setup sees: the run's --seed, --precision)
    monkeypatch.setattr(common, "setup", lambda args: seeds.append(args.seed) or setup(args))
    for stage in ("aligner", "1", "2"):
        if stage == "2":        # a stage built on another shape than the one trained before: refused
            with pytest.raises(SystemExit) as e:            # (it loaded what fitted and went on)
                ssr.main(base + ["--stage", "2", "--layers", "3", "--stage2-steps", "1"])
            assert e.value.code == 2 and f"--out {out}: its stage1, trained by another command: the run " \
                "was trained with --layers 1, not --layers 3" in capsys.readouterr().err
            assert not (out / "stage2").exists()
        ssr.main(base + ["--stage", stage] + {"aligner": ["--aligner-steps", "2", "--steps", "2", "--seed", "3"],
                                              "1": [], "2": ["--stage2-steps", "1"]}[stage])
        assert seeds[-1] == 3
        done = [s for s in ("aligner", "stage1", "stage2") if os.path.isfile(out / s / "latest")]
        assert len(done) == {"aligner": 1, "1": 2, "2": 3}[stage], (stage, done)
        final = json.loads(capsys.readouterr().out.split("final: ")[-1].splitlines()[0])
        assert {"aligner": "cer", "1": "acc_forced", "2": "text_loss"}[stage] in final
    ssr.main(["--resume", str(out)])          # the run's settings, its last command's --stage (it
    printed, err = capsys.readouterr()        # went on to train the stages after it, unasked)
    assert "at step 1 of --stage2-steps 1 already" in printed and "--aligner-steps" not in printed
    assert f"--resume {out}: --stage 2, the run's last command's" in err
    ssr.main(["--resume", str(out), "--stage", "all"])
    printed = capsys.readouterr().out                                   # (each stage names its flag)
    for says in ("at step 2 of --aligner-steps 2 already: nothing to train (a larger --aligner-steps",
                 "at step 2 of --steps 2 already", "at step 1 of --stage2-steps 1 already"):
        assert says in printed, printed
    with pytest.raises(SystemExit) as e:      # another shape: refused before any stage trains,
        ssr.main(["--resume", str(out), "--layers", "3"])              # no config.json changed
    assert e.value.code == 2 and "trained with --layers 1, not --layers 3" in capsys.readouterr().err
    assert json.loads(read(out / "config.json"))["layers"] == 1 and json.loads(read(out / "config.json"))["method"] == "ssr"
    for script in (blsp, blsp_kd):            # another method's run: refused, as --out or --resume
        for flags, says in ((["--out", str(out)], f"--out {out} holds a ssr run"),
                            (["--resume", str(out)], f"--resume {out}: a ssr run, not a ")):
            with pytest.raises(SystemExit) as e:
                script.main(flags + ["--steps", "1"])
            assert e.value.code == 2 and says in capsys.readouterr().err
    os.rename(out / "config.json", tmp_path / "config.json")    # an earlier version's run: its stages
    with pytest.raises(SystemExit) as e:                        # name the method
        blsp.main(["--out", str(out), "--steps", "1"])
    assert e.value.code == 2 and f"--out {out} holds a ssr run" in capsys.readouterr().err
    os.rename(tmp_path / "config.json", out / "config.json")
    with pytest.raises(SystemExit) as e:                # again: refused, naming the run, not a stage
        ssr.main(base + ["--stage", "1"])
    assert e.value.code == 2 and f"holds a trained stage1 already: --resume {out} " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                # a stage's directory given to --resume
        ssr.main(base + ["--resume", str(out / "stage1")])
    assert e.value.code == 2 and f"one stage of a ssr run: --resume takes the run's directory, {out}" \
        in capsys.readouterr().err


def test_stages_directories_and_their_messages(tmp_path):
    """common.Stages (SSR's run of stages): a stage is trained when its subdirectory has a
    checkpoint; each stage's arguments point into its subdirectory; --ckpt of one stage, of
    another method's run, or of a run without the needed stage is refused with a one-line error."""
    st = common.Stages("m", {"a": "first", "b": "second"}, "an M run", {"a": "--a-steps", "b": "--steps"})
    run = tmp_path / "run"

    def fake_checkpoint(d, method):
        os.makedirs(d / "ckpt-3")
        (d / "ckpt-3" / "meta.json").write_text(json.dumps(dict(method=method)))
        (d / "latest").write_text("ckpt-3")

    assert not st.trained(run, "a") and not st.trained(None, "a")
    fake_checkpoint(run / "first", "m-first")
    assert st.trained(run, "a") and not st.trained(run, "b") and st.method_of("b") == "m-second"
    args = common.Args(out=str(tmp_path / "new"), resume=str(run), warmup=20)
    a, b = st.args(args, "a", 10, 0.5), st.args(args, "b", 200, 0.1)
    assert (a.out, a.resume, a.steps, a.lr, a.warmup) == (str(tmp_path / "new" / "first"), str(run / "first"), 10, 0.5, 2)
    assert (b.resume, b.warmup) == (None, 20)               # nothing to resume in that stage
    fields = {"a": ("llm",), "b": ("llm",)}
    st.check(args, ["a", "b"], fields)
    cases = [(lambda: st.check(dataclasses.replace(args, resume=str(run / "first")), ["a"], fields),
              "no stage checkpoint in it (first/, second/)"),
             (lambda: st.check(common.Args(out=str(run)), ["b", "a"], fields), "holds a trained first already: --resume"),
             (lambda: st.load(nn.Linear(1, 1), run, "b", required=True), "no checkpoint (run --stage b first)"),
             (lambda: st.check_ckpt(str(run / "first"), "a"), f"one stage of an M run: --ckpt takes the run's directory, {run}"),
             (lambda: st.check_ckpt(str(run), "b"), "no second checkpoint (second/) in this run directory"),
             (lambda: st.check_ckpt(str(tmp_path / "nope"), "a"), "no such run directory")]
    fake_checkpoint(tmp_path / "other", "blsp")
    cases.append((lambda: st.check_ckpt(str(tmp_path / "other"), "a"), "a blsp run, not an M run"))
    for call, msg in cases:
        with pytest.raises(common.UserError, match=re.escape(msg)):
            call()
    st.check_ckpt(str(run), "a")


def test_ssr_all_stages_under_torchrun(ssr_tiny, tmp_path):
    """The longest flow under 2 gloo processes: the aligner, stage 1 and stage 2 one after another
    (rank 0 validates and writes while the other waits at the next all_reduce); every stage ends
    with a checkpoint, each process exits 0, the results are printed once."""
    out = tmp_path / "ddp"
    r = run_python(os.path.join(HERE, "ssr.py"), *ssr_base_args(ssr_tiny, out), "--batch-size", "1",
                   "--aligner-steps", "2", "--steps", "2", "--stage2-steps", "2", "--eval-every", "1",
                   torchrun=True)
    assert r.returncode == 0, r.stderr[:3000]
    for stage in ("aligner", "stage1", "stage2"):
        assert os.path.isfile(out / stage / "latest")
        assert json.loads((out / stage / "config.json").read_text())["world"] == 2
    assert r.stdout.count("final: ") == 1 and r.stdout.count("stage 2 text_loss") == 1

def test_ssr_compile_compiles_the_connector_a_bounded_number_of_times(ssr_tiny, tmp_path, monkeypatch):
    """--compile: the connector's layers take tensors, so the graphs do not grow with the batches
    (compiling the whole connector, whose masks come from Python lists of boundaries, gave a new
    graph for nearly every batch until dynamo's limit)."""
    graphs, real = [], torch.compile

    def counting(gm, inputs):
        graphs.append(1)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **k: real(fn, **{**k, "backend": counting}))
    torch._dynamo.reset()
    ssr.main(ssr_base_args(ssr_tiny, tmp_path / "run") + ["--aligner-steps", "1", "--steps", "12",
                                                          "--stage2-steps", "0", "--compile"])
    assert 0 < len(graphs) <= 6
    assert not (tmp_path / "run" / "stage2").exists()        # --stage2-steps 0: no stage 2 at all


def test_ssr_stage1_never_runs_llm_and_keeps_its_weights(ssr_tiny, tmp_path, monkeypatch):
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
    ssr.main(ssr_base_args(ssr_tiny, tmp_path / "r") + ["--stage", "1", "--aligner", "oracle", "--steps", "3",
                                                "--lr", "1e-2"])
    fresh = LlamaForCausalLM.from_pretrained(ssr_tiny / "llm")
    got = loaded[0][0].state_dict()
    assert all(torch.equal(v, got[k]) for k, v in fresh.state_dict().items())
    ck = common.find_checkpoint(str(tmp_path / "r" / "stage1"))
    from safetensors.torch import load_file
    assert all(k.startswith(("proj.", "blocks.")) for k in load_file(os.path.join(ck, "trainable.safetensors")))


# ============================================================================================
# slm (from test_slm.py)

def slm_tiny_t5(slm_tok, mt5=False, seed=0):
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    Config, Model = (MT5Config, MT5ForConditionalGeneration) if mt5 else (T5Config, T5ForConditionalGeneration)
    cfg = Config(vocab_size=len(slm_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1,
                 num_heads=4, pad_token_id=slm_tok.pad_token_id, eos_token_id=slm_tok.eos_token_id,
                 decoder_start_token_id=slm_tok.pad_token_id, dropout_rate=0.0)
    return common.freeze(Model(cfg))


def slm_tiny_whisper(d=32):
    from transformers import WhisperConfig, WhisperModel
    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=80, d_model=d, encoder_layers=1, encoder_attention_heads=2,
                        encoder_ffn_dim=2 * d, decoder_layers=1, decoder_attention_heads=2,
                        decoder_ffn_dim=2 * d, max_source_positions=1500, max_target_positions=16,
                        vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return WhisperModel(cfg)


@pytest.fixture(scope="module")
def slm_tok():
    return common.default_tokenizer(seq2seq=True)


def slm_adapter_for(llm, d_enc=12, stack=4, seed=0):
    torch.manual_seed(seed)
    return slm.Adapter(d_enc, llm.config.d_model, slm.embed_norm(llm), stack=stack, width=16,
                       layers=2, heads=2, ffn=32, dropout=0.0).eval()


def test_slm_adapter_shapes_stacking_rule_and_padding(slm_tok):
    llm = slm_tiny_t5(slm_tok)
    ad = slm_adapter_for(llm, d_enc=3, stack=4)
    frames = torch.randn(3, 10, 3)
    lens = torch.tensor([10, 7, 1])
    x, xl = ad.stack_frames(frames, lens)
    assert x.shape == (3, 3, 12) and xl.tolist() == [3, 2, 1]           # ceil(L / 4)
    for b, L in enumerate(lens.tolist()):
        for t in range(3):                                                # slow: frame by frame
            want = torch.cat([frames[b, i] if i < L else torch.zeros(3) for i in range(4 * t, 4 * t + 4)])
            assert torch.equal(x[b, t], want)
    out, ol = ad(frames, lens)
    assert out.shape == (3, 3, 32) and ol.tolist() == [3, 2, 1]
    # a clip's vectors do not depend on the batch (padding frames zeroed and masked)
    with torch.no_grad():
        for b, L in enumerate(lens.tolist()):
            one, n = ad(frames[b:b + 1, :L], lens[b:b + 1])
            torch.testing.assert_close(one[0, :n[0]], out[b, :n[0]], atol=1e-5, rtol=1e-5)
    # LayerNorm scale starts at mean |e| / sqrt(d): outputs have the embeddings' norm
    norm_e = llm.get_input_embeddings().weight.norm(dim=-1).mean()
    assert torch.allclose(ad.norm.weight, norm_e / math.sqrt(32) * torch.ones(32))
    assert abs(float(out[0].detach().norm(dim=-1).mean()) - float(norm_e)) < 0.05 * float(norm_e)


def test_slm_concatenated_attention_mask_and_order(slm_tok):
    llm = slm_tiny_t5(slm_tok)
    embed = llm.get_input_embeddings()
    v = [torch.randn(3, 32), torch.randn(1, 32)]
    ins = [[7, 8], [9, 10, 11]]
    for order in ("speech-first", "instruction-first"):
        sp = common.splice(embed, [slm.encoder_sample(speech(x), i, 1, order) for x, i in zip(v, ins)])
        assert sp.attention_mask.tolist() == [[1] * 6, [1] * 5 + [0]]   # 3+2+1 and 1+3+1 real
        for b in range(2):
            n, m = len(v[b]), len(ins[b])
            s0 = 0 if order == "speech-first" else m
            i0 = n if order == "speech-first" else 0
            assert torch.equal(sp.inputs_embeds[b, s0:s0 + n], v[b])
            assert torch.equal(sp.inputs_embeds[b, i0:i0 + m], embed(torch.tensor(ins[b])))
            assert torch.equal(sp.inputs_embeds[b, n + m], embed.weight[1])       # EOS last
            assert sp.speech_mask[b].sum() == n


def slm_samples_and_targets(slm_tok, llm, ad, lens=(9, 5, 13)):
    torch.manual_seed(1)
    frames = torch.randn(len(lens), max(lens), ad.proj_in.in_features // ad.stack)
    vecs, vl = ad(frames, torch.tensor(lens))
    vecs = [v[:n] for v, n in zip(vecs, vl.tolist())]
    inss = ["Transcribe the speech:", data.TOY_T5_INSTRUCTIONS["ast"][0], "Say it in toylish:"]
    tgts = ["the cat sees the dog", "tac", "the old fox finds the big bear"]
    return vecs, [slm.ids_of(slm_tok, s) for s in inss], [slm.ids_of(slm_tok, t) for t in tgts]


@pytest.mark.parametrize("mt5", [False, True])
def test_slm_loss_equals_t5_own_cross_entropy(slm_tok, mt5):
    """A padded batch (slm.padding_mask) = each sample alone through T5's (mT5's) own loss."""
    llm = slm_tiny_t5(slm_tok, mt5)
    ad = slm_adapter_for(llm)
    eos = slm_tok.eos_token_id
    vecs, inss, tgts = slm_samples_and_targets(slm_tok, llm, ad)
    samples = [slm.encoder_sample(speech(v), i, eos) for v, i in zip(vecs, inss)]
    loss, n, _ = slm.slm_loss(llm, samples, tgts, eos)
    assert n == sum(len(t) + 1 for t in tgts)
    embed = llm.get_input_embeddings()
    direct = 0.0
    for v, i, t in zip(vecs, inss, tgts):                      # one at a time, no padding at all
        x = torch.cat([v, embed(torch.tensor(i + [eos]))])[None]
        lab = torch.tensor([t + [eos]])
        direct += llm(inputs_embeds=x, labels=lab).loss * lab.numel()   # T5's own mean CE
    torch.testing.assert_close(loss, direct, atol=1e-4, rtol=1e-5)


def test_slm_only_adapter_trains_and_t5_is_unchanged(slm_tok):
    llm = slm_tiny_t5(slm_tok)
    before = copy.deepcopy(llm.state_dict())
    ad = slm_adapter_for(llm).train()
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2)
    eos = slm_tok.eos_token_id
    for _ in range(2):
        vecs, inss, tgts = slm_samples_and_targets(slm_tok, llm, ad)
        loss, n, _ = slm.slm_loss(llm, [slm.encoder_sample(speech(v), i, eos) for v, i in zip(vecs, inss)],
                                  tgts, eos)
        (loss / n).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())
        assert all(p.grad is None and not p.requires_grad for p in llm.parameters())
        opt.step()
        opt.zero_grad()
    after = llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not llm.training


def slm_greedy_slow(llm, x, eos, n):
    """Reference greedy decoding: encoder once, then the full decoder re-run for each token."""
    enc = llm.get_encoder()(inputs_embeds=x[None]).last_hidden_state
    ys = [llm.config.decoder_start_token_id]
    for _ in range(n):
        logits = llm(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ys])).logits
        ys.append(int(logits[0, -1].argmax()))
        if ys[-1] == eos:
            break
    return ys[1:]


def test_slm_generate_batched_equals_one_at_a_time(slm_tok):
    llm = slm_tiny_t5(slm_tok, seed=3)
    with torch.no_grad():                      # no special token wins: non-trivial answers
        llm.lm_head.weight.normal_(0, 1)
        llm.lm_head.weight[[slm_tok.pad_token_id, slm_tok.eos_token_id, slm_tok.unk_token_id]] = 0
    ad = slm_adapter_for(llm, seed=3)
    eos = slm_tok.eos_token_id
    vecs, inss, _ = slm_samples_and_targets(slm_tok, llm, ad)
    samples = [slm.encoder_sample(speech(v.detach()), i, eos) for v, i in zip(vecs, inss)]
    batched = slm.generate_ids(llm, slm_tok, samples, max_new_tokens=6)
    single = [slm.generate_ids(llm, slm_tok, [s], max_new_tokens=6)[0] for s in samples]
    assert batched == single and all(len(b) == 6 for b in batched)
    assert len({tuple(b) for b in batched}) > 1           # the input matters
    embed = llm.get_input_embeddings()
    for s, out in zip(samples, batched):
        x = torch.cat([seg.vectors if seg.ids is None else embed(torch.tensor(seg.ids)) for seg in s])
        assert out == slm_greedy_slow(llm, x.detach(), eos, 6)
    assert slm.answer(llm, slm_tok, samples[:1], 6) == [slm_tok.decode(batched[0]).strip()]


def test_corpus_bleu_against_hand_computation():
    assert common.corpus_bleu(["a b c d e f"], ["a b c d e f"]) == pytest.approx(100)
    # precisions 5/6, 4/5, 3/4, 2/3, no brevity penalty
    assert common.corpus_bleu(["a b c d e f"], ["a b c d e x"]) == pytest.approx(100 * (1 / 3) ** 0.25)
    # all precisions 1, c = 5 < r = 6: BP = exp(1 - 6/5)
    assert common.corpus_bleu(["a b c d e f"], ["a b c d e"]) == pytest.approx(100 * math.exp(-0.2))
    # clipping: "the the the the" against one "the"; corpus-level sums over sentences
    assert common.corpus_bleu(["the cat"], ["the the the the"]) == 0.0
    p = [(5 + 4) / (6 + 4), (4 + 0) / (5 + 3), (3 + 0) / (4 + 2), (2 + 0) / (3 + 1)]
    want = 100 * math.exp(sum(map(math.log, p)) / 4)         # c = 10 = r: BP 1
    assert common.corpus_bleu(["a b c d e f", "w x y z"], ["a b c d e x", "x w z y"]) == pytest.approx(want)


def test_slm_draw_tasks_uses_trained_phrasings_only():
    batch = dict(text=["a b", "c d", "e f"], translation=["x", None, "y"], where=["m:1", "m:2", "m:3"])
    import random
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        for k, (task, ins, tgt) in enumerate(slm.draw_tasks(batch, ["asr", "ast"], "toylish", rng)):
            assert tgt == (batch["text"][k] if task == "asr" else batch["translation"][k])
            assert ins in slm.instructions(task, "toylish")
            seen.add((k, task))
    assert seen == {(0, "asr"), (0, "ast"), (1, "asr"), (2, "asr"), (2, "ast")}
    with pytest.raises(data.DataError, match="m:2"):
        slm.draw_tasks(batch, ["ast"], "toylish", rng)
    assert all(slm.held_out(t, "toylish") not in slm.instructions(t, "toylish") for t in ("asr", "ast"))


@pytest.fixture(scope="module")
def slm_tiny(tmp_path_factory, slm_tok):
    from transformers import WhisperFeatureExtractor
    root = tmp_path_factory.mktemp("slm")
    for name, mt5 in (("t5", False), ("mt5", True)):
        slm_tiny_t5(slm_tok, mt5).save_pretrained(root / name)
        slm_tok.save_pretrained(root / name)
    slm_tiny_whisper().save_pretrained(root / "enc")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "enc")
    tm, vm = data.toy_corpus(str(root / "corpus"), n_train=12, n_valid=4, seed=2)
    return dict(root=root, train=tm, valid=vm, enc=str(root / "enc"))


def test_slm_main_end_to_end(slm_tiny, capsys, monkeypatch):
    """T5 and mT5; inference; eval. A training step never waits for the GPU (bench.HostSyncs)."""
    r = slm_tiny["root"]
    syncs = watch_host_syncs(monkeypatch)
    for name in ("t5", "mt5"):
        out = str(r / f"run-{name}")
        slm.main(["--llm", str(r / name), "--encoder", slm_tiny["enc"], "--train", slm_tiny["train"],
                  "--valid", slm_tiny["valid"], "--out", out, "--steps", "8", "--batch-size", "4",
                  "--width", "16", "--ffn", "32", "--heads", "2", "--warmup", "1", "--log-every", "1", "--lr", "1e-2",
                  "--max-new-tokens", "4", "--device", "cpu"])
        printed = capsys.readouterr().out
        assert "trainable parameters of" in printed and "asr [held-out]" in printed
        l = losses(out)
        assert len(l) == 8 and np.mean(l[-3:]) < np.mean(l[:3])    # t5 5.70 -> 5.49, mt5 19.5 -> 16.3
        assert len(syncs) == 2 and all(s.total() == 0 for _, s in syncs), [s.report() for _, s in syncs]
        syncs.clear()
        res = json.loads(printed.split("final: ")[1].splitlines()[0])
        for k in ("asr_wer", "asr_wer_heldout", "asr_wer_text", "ast_bleu", "ast_word_acc_heldout",
                  "continue_word_acc"):
            assert k in res
    wav = data.read_manifest(slm_tiny["valid"])[0]["audio"]
    slm.main(["--ckpt", out, "--infer", wav, "--instruction", "Write down what you hear.",
              "--max-new-tokens", "3", "--device", "cpu"])
    assert capsys.readouterr().out.count("\n") == 1          # one answer line (untrained: may be empty)
    asked, real = [], slm.ids_of                        # --infer --task ast: the translation's phrasing
    monkeypatch.setattr(slm, "ids_of", lambda tok, s: asked.append(s) or real(tok, s))   # (it was ASR's)
    slm.main(["--ckpt", out, "--infer", wav, "--task", "ast", "--max-new-tokens", "3", "--device", "cpu"])
    assert asked == [slm.instructions("ast", "toylish")[0]]
    monkeypatch.undo()
    capsys.readouterr()
    slm.main(["--ckpt", out, "--eval", slm_tiny["valid"], "--task", "ast", "--instruction",
              "Say it in toylish:", "--max-new-tokens", "3", "--device", "cpu"])
    res = json.loads(capsys.readouterr().out)
    assert {"ast_bleu", "ast_bleu_heldout", "ast_bleu_instruction", "ast_word_acc_text"} <= set(res)
    asked, real = [], slm.instructions                  # --language given: not the run's (toylish)
    monkeypatch.setattr(slm, "instructions", lambda task, language: asked.append(language) or real(task, language))
    slm.main(["--ckpt", out, "--eval", slm_tiny["valid"], "--task", "ast", "--language", "Frenchish",
              "--max-new-tokens", "2", "--device", "cpu"])
    assert asked and set(asked) == {"Frenchish"}


def test_flags_that_would_do_nothing_are_refused(tiny, slm_tiny, tmp_path, capsys):
    """A flag the command would ignore is a one-line error, before any model loads: a training flag
    with --ckpt (--out: the answers go to the run), BLSP-KD stage 1's LoRA flags, SLM's --prompt
    (T5 has no prompt format) and --task in training (--tasks), and --init given to a --resume
    (the run goes on from its own checkpoint: it said "in place of" and wrote it in config.json)."""
    run = tmp_path / "kd"
    os.makedirs(run)
    write(run / "config.json", json.dumps(dict(method="blsp_kd", init=None, stage=1)))
    for main, argv, says in (
            (blsp.main, ["--ckpt", str(tmp_path), "--eval", tiny["valid"], "--out", str(tmp_path / "o")],
             "--out is for training: with --ckpt (--infer, --eval) it does nothing"),
            (ssr.main, ["--ckpt", str(tmp_path), "--eval", tiny["valid"], "--steps", "3"], "--steps is for training"),
            (ssr.main, ["--ckpt", str(tmp_path), "--eval", tiny["valid"], "--stage2-lr", "5"],  # (a method's own)
             "--stage2-lr is for training"),
            (blsp_kd.main, ["--ckpt", str(tmp_path), "--eval", tiny["valid"], "--init", str(tmp_path)],
             "--init is for training"),
            (blsp_kd.main, ["--lora-r", "8", "--steps", "1"], "--lora-r is for stage 2 (stage 1 has no LoRA)"),
            (slm.main, ["--prompt", "chat"], "--prompt is for the causal LLMs' prompt formats"),
            (blsp.main, ["--schedule", "constant", "--min-lr-ratio", "0.1"], "--schedule constant does not decay"),
            (slm.main, ["--task", "ast"], "--task is the task of --ckpt's --eval and --infer: training takes --tasks"),
            (blsp_kd.main, ["--resume", str(run), "--init", str(tmp_path / "other")],
             f"--init {tmp_path / 'other'}: for a run that starts (the run's: None); --resume {run} goes on")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and err.count("\n") == 1, err


def test_eval_takes_the_runs_instruction(tiny, tmp_path, capsys, monkeypatch):
    """--ckpt --eval measures the zero-shot repeat with the run's --instruction, as its validation
    did (it took the default: repeat_wer 0.83 against the run's 8.41, a reviewer's run); --infer
    keeps the continuation instruction unless one is given."""
    out = tmp_path / "run"
    blsp.main(["--llm", tiny["llm"], "--encoder", tiny["enc"], "--train", tiny["train"], "--valid", tiny["valid"],
               "--batch-size", "8", "--bottleneck", "16", "--continuation-tokens", "4", "--max-new-tokens", "3",
               "--steps", "1", "--out", str(out), "--instruction", "Say it twice:", "--device", "cpu"])
    capsys.readouterr()
    asked, pieces = [], common.prompt_pieces
    monkeypatch.setattr(common, "prompt_pieces", lambda tok, ins, fmt="auto": asked.append(ins) or pieces(tok, ins, fmt))
    blsp.main(["--ckpt", str(out), "--eval", tiny["valid"], "--max-valid", "2", "--device", "cpu"])
    assert "Say it twice:" in asked and data.REPEAT_INSTRUCTIONS[0] not in asked
    asked.clear()
    blsp.main(["--ckpt", str(out), "--infer", data.read_manifest(tiny["valid"])[0]["audio"], "--device", "cpu"])
    assert asked == [blsp.CONTINUE_INSTRUCTION]


def test_slm_bad_input_gives_one_line_error(slm_tiny, tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    import soundfile as sf
    m.write_text(json.dumps(dict(audio="x.wav", text="the cat")) + "\n")
    sf.write(tmp_path / "x.wav", np.zeros(8000, np.float32), 16000)
    with pytest.raises(SystemExit):
        slm.main(["--llm", str(slm_tiny["root"] / "t5"), "--encoder", slm_tiny["enc"], "--train", str(m),
                  "--tasks", "ast", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no target for the tasks ast" in err and err.count("\n") == 1
    # a task of --tasks that no training line has a target for: said, and not recorded as trained
    # (it trained ASR alone silently, and --ckpt --eval reported AST's held-out phrasing as trained)
    small = ["--width", "16", "--ffn", "32", "--heads", "2", "--max-new-tokens", "2", "--device", "cpu"]
    slm.main(["--llm", str(slm_tiny["root"] / "t5"), "--encoder", slm_tiny["enc"], "--train", str(m),
              "--valid", slm_tiny["valid"], "--steps", "1", "--out", str(tmp_path / "asr")] + small)
    assert "no training utterance has a 'translation' field: --tasks asr,ast trains asr only" in \
        capsys.readouterr().err
    assert json.loads(read(tmp_path / "asr" / "config.json"))["tasks"] == "asr"
    slm.main(["--ckpt", str(tmp_path / "asr"), "--eval", slm_tiny["valid"], "--task", "ast", "--device", "cpu",
              "--max-new-tokens", "2"])
    res = json.loads(capsys.readouterr().out)
    assert "ast_bleu" in res and "ast_bleu_heldout" not in res, res          # (zero-shot: no held-out)
    for flags, says in ((["--tasks", "foo"], "--tasks foo: choose among"), ([], None)):
        if says is None:                        # --ckpt of another method's run (SSR's: no top-level checkpoint)
            os.makedirs(tmp_path / "ssr")
            write(tmp_path / "ssr" / "config.json", json.dumps(dict(method="ssr")))
            flags, says = ["--ckpt", str(tmp_path / "ssr")], f"{tmp_path / 'ssr'}: a ssr run, not a slm one"
        with pytest.raises(SystemExit):
            slm.main(["--ckpt", str(tmp_path / "asr"), "--eval", slm_tiny["valid"], "--device", "cpu"] + flags)
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        slm.main(["--llm", str(tmp_path / "nope"), "--encoder", slm_tiny["enc"], "--device", "cpu"])
    assert capsys.readouterr().err.startswith("error: --llm")
    with pytest.raises(SystemExit):
        slm.main(["--llm", str(slm_tiny["root"] / "t5"), "--encoder", slm_tiny["enc"], "--layers", "0",
                  "--device", "cpu", "--out", str(tmp_path / "o")])
    assert "--layers" in capsys.readouterr().err
