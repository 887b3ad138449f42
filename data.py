"""Data plumbing shared by the four methods (no paper logic here).

- Manifests: JSON lines, one utterance a line:
      {"audio": "path/relative/to/the/manifest.wav", "text": "the transcript", "duration": 3.2}
  plus optional task fields (`continuation`, `translation`, `chars`, `content`, ...).
- Audio: soundfile -> mono -> 16 kHz (torchaudio resampling) -> float32.
- Features, computed batched on the training device: Whisper log-mel, Kaldi fbank (w2v-BERT),
  normalised waveform (wav2vec2 / HuBERT).
- A length-bucketed batch sampler, deterministic per (seed, epoch), sharded over DDP ranks.
- The built-in toy corpus: sentences from a small grammar spoken by a deterministic synthetic
  voice (one tone pair per letter), with exact character boundaries, plus the toy "tasks" that the
  built-in LLMs learn (continue, repeat, translate) and the *content* words of each continuation:
  the words only the input sentence can tell.
- Manifests from LibriSpeech, Common Voice and CoVoST 2: `python data.py librispeech|tsv ... --out FILE`.
"""
import array
import errno
import glob
import json
import math
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
MIN_SAMPLES = 800               # 50 ms: every supported encoder makes at least one frame of it


class DataError(ValueError):
    """Bad input data; the message names the file and line or item."""


# ----------------------------------------------------------------------------------------------
# Manifests and audio

def read_manifest(path, required=("audio", "text")):
    """Read a JSON-lines manifest; audio paths become absolute. Errors name file:line."""
    if path and os.path.isdir(path):
        raise DataError(f"{path}: a directory, not a manifest (JSON lines: see the README; `python data.py "
                        f"librispeech DIR` writes one)")
    if not path or not os.path.isfile(path):
        raise DataError(f"manifest not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, "rb") as f:
        if f.read(4) in (b"RIFF", b"fLaC", b"OggS"):
            raise DataError(f"{path}: an audio file, not a manifest (JSON lines: see the README)")
        f.seek(0)
        for n, raw in enumerate(f, 1):
            try:                                    # (utf-8-sig: a Windows editor's BOM)
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            for key in required:
                if key not in row:
                    raise DataError(f"{path}:{n}: missing field '{key}'")
            for key in [k for k, v in row.items() if k not in required and (v is None or k in (
                    "continuation", "translation") and isinstance(v, str) and not v.strip())]:
                del row[key]                        # (null, or an empty reference: as if absent)
            if "text" in required and not str(row["text"]).strip():
                raise DataError(f"{path}:{n}: empty transcript")
            for key in ("audio", "text", "continuation", "translation"):
                if key in row and not isinstance(row[key], str):
                    raise DataError(f"{path}:{n}: '{key}' must be a string, not {type(row[key]).__name__}")
            chars = row.get("chars")
            if chars is not None and not (isinstance(chars, list) and all(
                    isinstance(c, list) and len(c) == 3 and isinstance(c[0], str) and all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) for x in c[1:]) for c in chars)):
                raise DataError(f"{path}:{n}: 'chars' must be a list of [character, start_s, end_s]")
            dur = row.get("duration", 0.0)
            if isinstance(dur, bool) or not isinstance(dur, (int, float)) or not 0 <= dur < math.inf:
                raise DataError(f"{path}:{n}: 'duration' must be a number of seconds, not {dur!r}")
            row["audio"] = os.path.join(root, row["audio"])
            row["where"] = f"{path}:{n}"
            items.append(row)
    if not items:
        raise DataError(f"{path}: no utterances")
    return items


def missing_audio(path):
    """Why `path` is no audio file, seen without reading it, or None."""
    if os.path.isfile(path):
        return None
    return "a directory, not an audio file" if os.path.isdir(path) else "audio file not found"


def clip_problem(n, max_samples=None):
    """What no encoder takes in a clip of n samples (16 kHz), or one past this encoder's window
    (max_samples), or None."""
    if n < MIN_SAMPLES:
        return f"a clip of {n / SAMPLE_RATE * 1000:.0f} ms: too short (at least {MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms)"
    if max_samples and n > max_samples:
        return f"a clip of {n / SAMPLE_RATE:.2f} s is longer than the encoder's {max_samples / SAMPLE_RATE:.0f} s window"
    return None


def load_audio(path, where=None, max_samples=None):
    """Read a file -> mono float32 tensor at 16 kHz. One-line DataError on any problem (a clip
    past max_samples, the encoder's window, too)."""
    import soundfile as sf
    import torchaudio
    name, at = (where, f": {path}") if where else (path, "")
    if (problem := missing_audio(path)):
        raise DataError(f"{name}: {problem}{at}")
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt files
        raise DataError(f"{name}: cannot read audio{at} ({type(e).__name__}: {e})") from None
    wave = torch.from_numpy(wave.mean(axis=1))
    if wave.numel() == 0:
        raise DataError(f"{name}: empty audio{at}")
    if not torch.isfinite(wave).all():
        raise DataError(f"{name}: non-finite samples{at}")
    if (peak := float(wave.abs().max())) > 1e6:      # (x^2 in the spectrogram would overflow fp32)
        raise DataError(f"{name}: samples reach {peak:.3g}: not audio (files read in [-1, 1]){at}")
    if sr != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, sr, SAMPLE_RATE)
    if (problem := clip_problem(len(wave), max_samples)):
        raise DataError(f"{name}: {problem}{at}")
    return wave


def duration_of(item):
    if "duration" in item:
        return float(item["duration"])
    import soundfile as sf
    try:
        return sf.info(item["audio"]).duration
    except Exception:
        return 0.0  # unreadable: load_audio reports it properly when the item is used


_WARNED = set()         # what a process has warned about once (not again each epoch, stage or validation)


def warn_once(key, msg):
    """Print msg on stderr the first time `key` comes in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        print(msg, file=sys.stderr)


class SpeechDataset(torch.utils.data.Dataset):
    """Items of a manifest -> {"wave": tensor, **item}. Bad audio raises (in a loader's worker
    process: passed on as {"_error": message}, Loader raises it), or is skipped. A clip whose length
    is far from its manifest `duration` is reported once: batches are made from the durations."""

    def __init__(self, items, skip_bad=False, max_samples=None):
        self.items, self.skip_bad, self.max_samples = items, skip_bad, max_samples

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            wave = load_audio(item["audio"], item.get("where"), self.max_samples)
        except DataError as e:
            if self.skip_bad:
                print(f"skipping bad item: {e}", file=sys.stderr)
                return None
            if torch.utils.data.get_worker_info() is not None:
                return {"_error": str(e)}           # (torch would wrap it in its own traceback)
            raise
        said, real = item.get("duration"), len(wave) / SAMPLE_RATE
        if said is not None and abs(real - said) > 0.1 * said + 0.1 and "duration" not in _WARNED:
            msg = (f"warning: {item.get('where', item['audio'])}: 'duration' {said:g} s, but the audio "
                   f"lasts {real:.2f} s: batches (and --max-seconds) go by the manifest's durations "
                   f"(only the first such clip is reported)")
            if torch.utils.data.get_worker_info() is not None:
                return dict(item, wave=wave, _warning=msg)      # (said by Loader: a worker's own
            warn_once("duration", msg)                          # _WARNED starts empty each epoch)
        return dict(item, wave=wave)


def first_loadable(items):
    """(item, wave) of the first item whose audio loads (a bad one is named and passed over)."""
    for it in items:
        try:
            return it, load_audio(it["audio"], it.get("where"))
        except DataError as e:
            print(f"skipping bad item: {e}", file=sys.stderr)
    raise DataError("no item with readable audio")


class Loader:
    """A DataLoader whose workers' DataErrors are raised here, as one line."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for b in self.loader:
            if b is not None and "_error" in b:
                raise DataError(b["_error"])
            for msg in (b or {}).pop("_warning", None) or ():
                if msg:
                    warn_once("duration", msg)
            yield b

    def __len__(self):
        return len(self.loader)


def compact(ids):
    """Token ids as a manifest item keeps them: one array of 4-byte ints, not a list of int
    objects (a ninth of the memory: millions of items; and loader workers, reading an item,
    copied each int's page to count a reference). collate hands them on as lists."""
    return array.array("i", ids)


def collate(rows):
    """Pad waveforms at the end; keep every other field as a list (compact ids: lists again)."""
    bad = next((r for r in rows if r is not None and "_error" in r), None)
    if bad:
        return bad
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    lens = torch.tensor([len(r["wave"]) for r in rows])
    wave = torch.zeros(len(rows), int(lens.max()))
    for i, r in enumerate(rows):
        wave[i, :lens[i]] = r["wave"]
    keys = dict.fromkeys(k for r in rows for k in r if k != "wave")   # fields missing in a row: None
    as_list = lambda v: v.tolist() if isinstance(v, array.array) else v
    batch = {k: [as_list(r.get(k)) for r in rows] for k in keys}
    batch.update(wave=wave, wave_lens=lens)
    return batch


# ----------------------------------------------------------------------------------------------
# Length-bucketed batches

class BucketBatchSampler:
    """Batches of similar duration: less padding, fewer wasted FLOPs.

    Items are shuffled, cut into pools of `pool` steps, each pool is sorted by duration and cut
    into batches, then the batches are shuffled in groups of `step` neighbours, the batches of
    one optimizer step (w processes x gradient accumulation; default w): rank r of w takes
    batches r, r + w, ... of each group. So a step's batches have similar lengths and no process
    waits long for another's; and w processes see what one process sees with w times the
    accumulation. Every rank gets as many batches (the last few, fewer than w, are left out); one
    process, one batch a step: the batches are shuffled alone. A batch holds at most
    `batch_size` items and at most `max_seconds` of padded audio. Deterministic per (seed,
    epoch), laid out once per epoch. `start` skips batches already seen (resume).
    """

    def __init__(self, durations, batch_size, max_seconds=None, shuffle=True, seed=0, rank=0,
                 world=1, pool=50, step=None):
        self.durations = list(durations)
        self.batch_size, self.max_seconds = batch_size, max_seconds
        self.shuffle, self.seed, self.rank, self.world, self.pool = shuffle, seed, rank, world, pool
        self.step = step or world
        assert self.step % world == 0, "a step's batches: a multiple of the processes"
        self.epoch, self.start, self.cached = 0, 0, (None, None)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def batches(self):
        if self.cached[0] != self.epoch:            # (millions of items: seconds to lay out)
            self.cached = (self.epoch, self.lay_out())
        return self.cached[1]

    def lay_out(self):
        order = list(range(len(self.durations)))
        rng = random.Random(self.seed * 1000003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        chunk = self.batch_size * self.pool * self.step
        out = []
        for c in range(0, len(order), chunk):
            pool = sorted(order[c:c + chunk], key=lambda i: self.durations[i])
            batch, longest = [], 0.0
            for i in pool:
                longest2 = max(longest, self.durations[i])
                full = len(batch) >= self.batch_size or (
                    self.max_seconds and batch and longest2 * (len(batch) + 1) > self.max_seconds)
                if full:
                    out.append(batch)
                    batch, longest2 = [], self.durations[i]
                batch.append(i)
                longest = longest2
            if batch:
                out.append(batch)
        k, w = self.step, self.world
        full = len(out) // k * k
        groups = [out[g:g + k] for g in range(0, full, k)]          # a step's neighbours
        if self.shuffle:
            rng.shuffle(groups)
        groups.append(out[full:len(out) // w * w])      # a short last step, last (as many batches
        return [b for g in groups for b in g[self.rank::w]]     # for every process; fewer than w: none)

    def __iter__(self):
        return iter(self.batches()[self.start:])

    def __len__(self):
        return max(0, len(self.batches()) - self.start)

    def padding_fraction(self):
        """Share of padded audio in the batches of this epoch (0 = no padding)."""
        real = padded = 0.0
        for b in self.batches():
            d = [self.durations[i] for i in b]
            real += sum(d)
            padded += max(d) * len(d)
        return 1 - real / max(padded, 1e-9)


def make_loader(items, batch_size, max_seconds=None, shuffle=True, seed=0, rank=0, world=1,
                workers=0, skip_bad=False, pin_memory=False, max_samples=None, step=None):
    sampler = BucketBatchSampler([duration_of(i) for i in items], batch_size, max_seconds,
                                 shuffle, seed, rank, world, step=step)
    loader = torch.utils.data.DataLoader(
        SpeechDataset(items, skip_bad, max_samples), batch_sampler=sampler, collate_fn=collate,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),   # never draws from the global RNG
        worker_init_fn=leave_stop_signals_to_the_main_process if workers else None)
    return Loader(loader), sampler


def leave_stop_signals_to_the_main_process(worker_id):
    """A loader worker ignores Ctrl-C and SIGTERM, which reach the whole process group (a
    cluster's preemption): a worker they killed made the main process raise ("DataLoader worker
    ... killed by signal") wherever it was, in its checkpoint too. The main process stops the
    workers when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def to_gpu(t, device):
    """A host tensor to the device without making the host wait: from pinned memory, a CUDA copy
    is queued like a kernel (from pageable memory, CUDA may first wait for the stream to drain)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Features, batched on the device

def whisper_log_mel(wave, wave_lens, mel_filters, n_fft=400, hop=160):
    """Whisper's log-mel (as WhisperFeatureExtractor) on the batch's real length, not 30 s.

    wave: (B, S) zero-padded; mel_filters: (n_fft//2+1, n_mels). Returns (B, n_mels, S//hop) and
    frame lengths. HF pads every clip to 30 s first; appending n_fft//2 zeros gives the same
    frames for the real part (a clip of 30 s: its STFT's reflection of its own end, as HF's). The
    clamp at max-8 is taken over each clip's real frames (HF's also sees the frame after the clip:
    the same unless the clip ends in its loudest sound).
    """
    wave = F.pad(wave.float(), (0, n_fft // 2))
    for i in (wave_lens >= 30 * SAMPLE_RATE).nonzero().flatten().tolist():      # (lengths: host)
        n = int(wave_lens[i])
        wave[i, n:n + n_fft // 2] = wave[i, n - n_fft // 2 - 1:n - 1].flip(0)
    window = torch.hann_window(n_fft, device=wave.device)
    stft = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2                              # (B, F, T); HF drops the last frame
    n_frames = (wave.shape[1] - n_fft // 2) // hop
    power = power[..., :n_frames]
    mel = mel_filters.T.to(power) @ power                        # (B, n_mels, T)
    log = torch.clamp(mel, min=1e-10).log10()
    lens = wave_lens // hop
    valid = torch.arange(log.shape[-1], device=log.device)[None, :] < to_gpu(lens, log.device)[:, None]
    peak = log.masked_fill(~valid[:, None, :], -1e9).amax(dim=(1, 2), keepdim=True)
    log = torch.maximum(log, peak - 8.0)
    return (log + 4.0) / 4.0, lens


def kaldi_fbank(wave, wave_lens, n_mels=80, stride=2):
    """w2v-BERT / SeamlessM4T input features: Kaldi fbank (scaled to int16 range), per-clip
    mean/variance normalisation over the real frames, then `stride` frames stacked."""
    import torchaudio
    feats, lens = [], []
    for w, n in zip(wave, wave_lens):
        fb = torchaudio.compliance.kaldi.fbank(
            w[:n].float()[None] * 32768, num_mel_bins=n_mels, sample_frequency=SAMPLE_RATE,
            window_type="povey", dither=0.0, energy_floor=0.0, use_energy=False,
            preemphasis_coefficient=0.97, remove_dc_offset=True, snip_edges=True)
        fb = (fb - fb.mean(0)) / torch.sqrt(fb.var(0) + 1e-7)
        t = fb.shape[0] // stride * stride
        feats.append(fb[:t].reshape(t // stride, n_mels * stride))
        lens.append(t // stride)
    out = torch.zeros(len(feats), max(lens), n_mels * stride, device=wave.device)
    for i, f in enumerate(feats):
        out[i, :len(f)] = f
    return out, torch.tensor(lens)


def normalized_wave(wave, wave_lens):
    """wav2vec2 / HuBERT input: zero mean, unit variance over each clip's real samples."""
    lens = to_gpu(wave_lens, wave.device)
    mask = torch.arange(wave.shape[1], device=wave.device)[None] < lens[:, None]
    n = lens.to(wave.dtype)[:, None]
    mean = (wave * mask).sum(1, keepdim=True) / n
    var = (((wave - mean) * mask) ** 2).sum(1, keepdim=True) / n
    return ((wave - mean) / torch.sqrt(var + 1e-7)) * mask, wave_lens


# ----------------------------------------------------------------------------------------------
# The built-in toy corpus

ADJECTIVES = ["red", "old", "big", "small", "green", "happy", "quiet", "brave", "little", "dark",
              "bright", "cold", "young", "tall", "lazy", "clever"]
NOUNS = ["cat", "dog", "fox", "bird", "horse", "king", "queen", "farmer", "sailor", "child",
         "teacher", "doctor", "wolf", "bear", "rabbit", "mouse", "girl", "boy", "soldier", "baker",
         "lion", "tiger", "goat", "sheep"]
VERBS = ["sees", "finds", "helps", "follows", "calls", "meets", "watches", "likes", "chases",
         "greets", "visits", "thanks"]
# The toy "translation" (for SLM): a fixed word-for-word lexicon and a different word order.
TOY_LANGUAGE = "toylish"
LEXICON = {w: w[::-1] + "o" for w in ADJECTIVES + NOUNS + VERBS + ["the", "then", "again"]}

# Instruction phrasings the built-in LLMs are taught (the small-scale counterpart of BLSP's own
# stage 1, text instruction tuning). The papers' own wordings are among them.
CONTINUE_INSTRUCTIONS = [
    "Continue the following text in a coherent and engaging style with less than 40 words.",  # BLSP
    "Continue the following text in a coherent style:",                                       # BLSP-KD
    "Continue the text:",
]
REPEAT_INSTRUCTIONS = ["Repeat the following text:", "Write down the text:"]


def toy_t5_instructions():
    """Every instruction phrasing the built-in T5 is taught."""
    return [s for v in TOY_T5_INSTRUCTIONS.values() for s in v] + TOY_T5_HELD_OUT


# Instructions the built-in T5 follows (text in, text out); SLM's adapter learns to stand in
# for the text, and one phrasing per task is held out of SLM's training.
TOY_T5_INSTRUCTIONS = {
    "asr": ["Repeat the following text:", "Write down the text:", "Transcribe the speech:"],
    "ast": [f"Translate the following text into {TOY_LANGUAGE}:",
            f"Translate the speech into {TOY_LANGUAGE}:", f"Say it in {TOY_LANGUAGE}:"],
    "continue": list(CONTINUE_INSTRUCTIONS),
}
TOY_T5_HELD_OUT = ["Copy out exactly what is said:", f"Render this in {TOY_LANGUAGE}:"]


def toy_sentence(rng):
    """the [adj] noun verb the [adj] noun"""
    def phrase():
        return (["the"] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.6 else [])
                + [rng.choice(NOUNS)])
    subj, obj = phrase(), phrase()
    while obj[-1] == subj[-1]:
        obj = phrase()
    return " ".join(subj + [rng.choice(VERBS)] + obj)


def toy_tasks(sentence):
    """The toy behaviours of a sentence, and the *content* words of its continuation.

    continue:  "the old fox sees the cat" -> "then the cat sees the fox again"
               (the roles swapped: object, verb, subject are the three words only the input
               can tell)
    translate: word-for-word lexicon, object phrase first.
    Returns dict(continuation, content=[[start, end] char spans], translation).
    """
    w = sentence.split()
    v = next(i for i, x in enumerate(w) if x in VERBS)
    subj, verb, obj = w[v - 1], w[v], w[-1]
    pieces = ["then", "the", obj, verb, "the", subj, "again"]
    content_at = {2, 3, 5}
    text, content = "", []
    for i, p in enumerate(pieces):
        start = len(text) + (1 if text else 0)
        text = (text + " " + p) if text else p
        if i in content_at:
            content.append([start, start + len(p)])
    translation = " ".join(LEXICON[x] for x in w[v + 1:] + [w[v]] + w[:v])
    return dict(continuation=text, content=content, translation=translation)


# The synthetic voice: each letter is a pair of tones (a low and a high "formant"), shifted by a
# per-speaker factor, spoken at a per-utterance rate; words are separated by short pauses.
LETTERS = "abcdefghijklmnopqrstuvwxyz'"
_LOW = [300, 450, 600, 800, 1000, 1250]
_HIGH = [1600, 2000, 2500, 3000, 3600]


def synthesize(text, rng, sr=SAMPLE_RATE):
    """-> (wave float32 np.array, [(char, start_s, end_s)]) with exact character boundaries."""
    shift = rng.uniform(0.92, 1.08)
    rate = rng.uniform(0.8, 1.25)
    parts, chars, t = [np.zeros(int(0.08 * sr), np.float32)], [], 0.08
    for c in text:
        if c == " ":
            d = 0.03 * rate
            parts.append(np.zeros(int(d * sr), np.float32))
            t += int(d * sr) / sr
            continue
        i = LETTERS.index(c)
        d = 0.05 * rate * rng.uniform(0.9, 1.1)
        n = int(d * sr)
        tt = np.arange(n) / sr
        f1, f2 = _LOW[i % 6] * shift, _HIGH[i // 6 % 5] * shift
        env = np.minimum(1, np.minimum(tt, tt[::-1]) / 0.005)
        parts.append((env * (0.5 * np.sin(2 * np.pi * f1 * tt) + 0.3 * np.sin(2 * np.pi * f2 * tt)))
                     .astype(np.float32))
        chars.append((c, round(t, 5), round(t + n / sr, 5)))
        t += n / sr
    parts.append(np.zeros(int(0.08 * sr), np.float32))
    wave = np.concatenate(parts)
    wave += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 0.01, len(wave)).astype(np.float32)
    return wave, chars


def toy_corpus(cache_dir=None, n_train=2000, n_valid=200, seed=0):
    """Build (once, cached) the toy corpus -> (train_manifest, valid_manifest).

    Valid sentences never occur in train. Each line has text, duration, the toy task targets
    (continuation, content spans, translation) and exact character boundaries (`chars`).
    """
    import soundfile as sf
    cache_dir = cache_dir or os.path.join(cache_root(), f"toy-corpus-v2-{n_train}-{n_valid}-{seed}")
    train_m, valid_m = os.path.join(cache_dir, "train.jsonl"), os.path.join(cache_dir, "valid.jsonl")
    if os.path.isfile(valid_m) and os.path.isfile(train_m):
        return train_m, valid_m
    rng = random.Random(seed)
    seen, splits = set(), {"train": n_train, "valid": n_valid}
    tmp = cache_dir + f".tmp{os.getpid()}"
    for split, n in splits.items():
        os.makedirs(os.path.join(tmp, split), exist_ok=True)
        with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
            for k in range(n):
                s = toy_sentence(rng)
                while s in seen:
                    s = toy_sentence(rng)
                seen.add(s)
                wave, chars = synthesize(s, rng)
                rel = f"{split}/{k:05d}.wav"
                sf.write(os.path.join(tmp, rel), wave, SAMPLE_RATE, subtype="PCM_16")
                row = dict(audio=rel, text=s, duration=round(len(wave) / SAMPLE_RATE, 4),
                           chars=chars, **toy_tasks(s))
                f.write(json.dumps(row) + "\n")
    os.makedirs(os.path.dirname(cache_dir) or ".", exist_ok=True)
    try:
        os.replace(tmp, cache_dir)
    except OSError:  # another process built it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return train_m, valid_m


def toy_vocabulary():
    """Every word the toy corpus, its tasks and the toy instructions can produce."""
    words = set(ADJECTIVES + NOUNS + VERBS + ["the", "then", "again", TOY_LANGUAGE])
    words |= set(LEXICON.values())
    return sorted(words)


def cache_root():
    return os.environ.get("SPEECHLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "speechlm-ref"))


# ----------------------------------------------------------------------------------------------
# Manifests from the corpora the papers train on: python data.py librispeech|tsv ... --out FILE

def librispeech_rows(root):
    """A LibriSpeech folder (train-clean-100, dev-clean...) -> (audio, text, where, extra) for each
    line "ID WORDS" of its SPEAKER-CHAPTER.trans.txt files (ID.flac beside them); text lower-cased."""
    found = sorted(glob.glob(os.path.join(root, "**", "*.trans.txt"), recursive=True))
    if not found:
        raise DataError(f"{root}: no *.trans.txt below it (give a LibriSpeech folder such as train-clean-100)")
    for tr in found:
        with open(tr, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                uid, _, words = line.strip().partition(" ")
                if uid and not words.strip():
                    raise DataError(f"{tr}:{n}: expected 'ID WORDS'")
                if uid:
                    yield os.path.join(os.path.dirname(tr), uid + ".flac"), words.strip().lower(), f"{tr}:{n}", {}


def tsv_rows(path, clips=None):
    """A Common Voice or CoVoST 2 TSV (columns path, sentence, and translation in CoVoST) -> rows;
    clips: the folder of the audio files (default: clips/ beside the TSV, Common Voice's layout)."""
    import csv
    clips = clips or os.path.join(os.path.dirname(os.path.abspath(path)), "clips")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig", newline="") as f:       # (a BOM: not in the first column's name)
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = sorted({"path", "sentence"} - set(reader.fieldnames or ()))
        if missing:
            raise DataError(f"{path}: no column '{missing[0]}' (a Common Voice or CoVoST 2 TSV has path "
                            f"and sentence)")
        for n, row in enumerate(reader, 2):
            if not row.get("path"):
                raise DataError(f"{path}:{n}: its 'path' is empty")
            if (row.get("sentence") or "").strip():
                extra = {"translation": row["translation"]} if (row.get("translation") or "").strip() else {}
                yield os.path.join(clips, row["path"]), row["sentence"].strip(), f"{path}:{n}", extra


def write_manifest(rows, out, skip_bad=False, threads=8):
    """rows -> the manifest `out` (audio relative to it; each duration read from its file's
    header, in threads), written whole or not at all. A missing or unreadable file stops it,
    named with its source line, unless skip_bad (then named on stderr and left out).
    -> (utterances written, hours, utterances left out)."""
    import soundfile as sf
    from concurrent.futures import ThreadPoolExecutor
    rows, base = list(rows), os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise DataError(f"--out {out}: a directory (give the manifest's file name)")
    try:
        os.makedirs(base, exist_ok=True)
        open(out + ".tmp", "w").close()
    except OSError as e:
        why = "a file in its path" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror
        raise DataError(f"--out {out}: cannot write there ({why})") from None

    def duration(row):
        audio, where = row[0], row[2]
        problem = missing_audio(audio)
        if problem is None:
            try:
                return sf.info(audio).duration, None
            except Exception as e:      # (soundfile raises several types)
                problem = f"cannot read audio ({type(e).__name__})"
        return None, f"{where}: {problem}: {audio}"

    n = hours = bad = 0
    tmp = out + ".tmp"
    with ThreadPoolExecutor(threads) as pool, open(tmp, "w", encoding="utf-8") as f:
        read = (d for k in range(0, len(rows), 4096) for d in pool.map(duration, rows[k:k + 4096]))
        for (audio, txt, _, extra), (dur, problem) in zip(rows, read):
            if problem and not skip_bad:
                f.close(), os.remove(tmp)
                raise DataError(f"{problem} (--skip-bad leaves such lines out)")
            if problem:
                print(f"skipping bad item: {problem}", file=sys.stderr)
                bad += 1
                continue
            f.write(json.dumps(dict(audio=os.path.relpath(audio, base), text=txt, duration=round(dur, 3),
                                    **extra), ensure_ascii=False) + "\n")
            n, hours = n + 1, hours + dur / 3600
    if n == 0:
        os.remove(tmp)
        raise DataError(f"{out}: no utterance to write")
    os.replace(tmp, out)
    return n, hours, bad


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python data.py", description="Write a training manifest (JSON "
                                "lines: audio, text, duration[, translation]) from a public corpus.")
    sub = p.add_subparsers(dest="corpus", required=True)
    ls = sub.add_parser("librispeech", help="LibriSpeech folders (train-clean-100 train-clean-360 ...)")
    ls.add_argument("sources", nargs="+", metavar="FOLDER")
    tsv = sub.add_parser("tsv", help="Common Voice or CoVoST 2 TSV files (path, sentence[, translation])")
    tsv.add_argument("sources", nargs="+", metavar="TSV")
    tsv.add_argument("--clips", help="the folder of the audio files (default: clips/ beside each TSV)")
    for s in (ls, tsv):
        s.add_argument("--out", required=True, metavar="MANIFEST", help="the manifest to write")
        s.add_argument("--skip-bad", action="store_true", help="leave out missing or unreadable audio "
                       "(each named on stderr) instead of stopping")
    args = p.parse_args(argv)
    rows = (row for src in args.sources for row in (
        librispeech_rows(src) if args.corpus == "librispeech" else tsv_rows(src, args.clips)))
    try:
        n, hours, bad = write_manifest(rows, args.out, args.skip_bad)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    size = f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.1f} s"
    print(f"{args.out}: {n} utterance{'s' if n != 1 else ''}, {size}" + (f" ({bad} left out)" if bad else ""))


if __name__ == "__main__":
    main()
