"""Features of one layer of a local Hugging Face HuBERT model, batched, at the unit frame rate.

The model is a `transformers.HubertModel` directory (`config.json` + weights, e.g. what
`save_pretrained` writes); nothing is downloaded. Layer L is the output of transformer layer L
(1-based; 0 is the transformer's input), as `output_hidden_states` numbers them and as fairseq's
`output_layer` does: the textless HuBERT-base units use layer 6. (Models with stable layer norm
apply their final layer norm only after the last layer; no layer output here includes it.)

Batching pads waveforms, and padding must not change any utterance's features:

- a convolutional feature encoder with group norm (HuBERT base) normalises each channel over the
  whole time axis, padding included, so it runs one utterance at a time; with layer norm (HuBERT
  large) each frame is normalised alone and the padded batch runs at once (a valid output frame's
  receptive field never reaches the padding);
- the transformer zeroes padded frames (the positional convolution then sees the same zeros as
  past the end of an unpadded utterance) and masks them as attention keys.

Waveforms are normalised to zero mean and unit variance, each on its own, when the model was
trained on such input: as `preprocessor_config.json`'s `do_normalize` says when the directory has
one (Hugging Face's feature extractor), else for models with a layer-norm feature encoder (HuBERT
large and extra large were pre-trained with fairseq's `normalize: true`, base without).

Only layers 1..L run. The model's native frames (50 Hz for a 320x downsampling at 16 kHz) are
averaged in groups to the unit rate (25 Hz): an utterance of n samples at 16 kHz has
n // (16000 / frame_rate) units, unit j covering [j / rate, (j + 1) / rate) seconds; the convolution
drops a partial frame at the end, which the last frame is repeated to fill.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from megatron_lst.data.input_files import read_bounded_bytes
from megatron_lst.demo_corpus.optional import MissingDependencyError, require
from megatron_lst.demo_corpus.units import FEATURE_SAMPLE_RATE, UNIT_FRAME_RATE


def load_transformers():
    """The `transformers` package with its model classes loaded; ImportError when it is missing.

    transformers 5 imports the Hugging Face `kernels` package when its models load. This
    repository's `kernels/` folder (installed as `lst_kernels`) has the same name and shadows that
    package whenever the checkout's root is on `sys.path` (`python -m pytest` from the root, or a
    PYTHONPATH naming it), and the models then fail to import. They are loaded once here with
    such entries hidden; `lst_kernels` is found through its install, not through `sys.path`.
    """
    import transformers

    root = Path(__file__).resolve().parents[2]
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if Path(entry or os.getcwd()).resolve() != root]
    try:
        transformers.HubertModel  # noqa: B018 (the lazy module imports the models here)
    finally:
        sys.path[:] = saved
    return transformers


# Used only in pre-training (masked frames); a checkpoint may leave it out.
_TRAINING_ONLY_WEIGHTS = ("masked_spec_embed",)


def _read_json_object(path: Path) -> dict | None:
    """The JSON object in the model's file `path`, None when it holds no JSON object (damaged, or
    nested deeper than Python's stack); ValueError naming it when it is not a regular file or is
    larger than any config (a FIFO would block, a device be read forever)."""
    data = read_bounded_bytes(path, ValueError, "model config (JSON)")
    try:
        value = json.loads(data.decode("utf-8"))
    # ValueError: not UTF-8, not JSON, or an integer past Python's digit limit
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _check_model_type(model_dir: Path) -> None:
    """Refuse a directory whose config.json names another model type: transformers loads, e.g.,
    a WavLM checkpoint as a HubertModel with a warning, dropping WavLM's relative position bias,
    and every feature would be of a model that does not exist."""
    path = model_dir / "config.json"
    config = _read_json_object(path)
    if config is None:
        return  # transformers names what is wrong with the file
    model_type = config.get("model_type")
    if model_type not in ("hubert", None):  # None: a hand-written config, left to transformers
        raise ValueError(f"{path}: holds a {model_type!r} model, not a HuBERT model "
                         f"(model_type 'hubert'); pass the directory of a HuBERT checkpoint "
                         f"(e.g. facebook/hubert-base-ls960 saved with `save_pretrained`)")


def _load_model(transformers, model_dir: Path):
    """The `HubertModel` saved in `model_dir`, refusing a directory of another model type, or
    whose weights are missing, unreadable or incomplete: transformers would fill missing
    weights with random values and only log a warning, and every unit would then be noise."""
    _check_model_type(model_dir)
    try:
        model, info = transformers.HubertModel.from_pretrained(
            str(model_dir), local_files_only=True, attn_implementation="sdpa",
            use_kernels=False, output_loading_info=True)  # kernels would be fetched from the Hub
    except pickle.UnpicklingError as error:  # torch's advice (weights_only=False) is not ours
        raise ValueError(f"{model_dir}: its weights file is a pickle holding more than tensors, "
                         f"which the weights-only load refuses (unpickling it could run any "
                         f"code); from a copy you trust, re-save the model with "
                         f"`save_pretrained` (model.safetensors)") from error
    except Exception as error:  # OSError, SafetensorError, config validation
        first_line = str(error).strip().split("\n")[0]
        raise ValueError(f"{model_dir}: cannot load a HuBERT model from this directory "
                         f"({type(error).__name__}: {first_line}); pass the complete directory "
                         f"`save_pretrained` wrote (config.json and the weights)") from error
    missing = [k for k in info["missing_keys"] if k not in _TRAINING_ONLY_WEIGHTS]
    if missing:
        raise ValueError(f"{model_dir}: the weights lack {len(missing)} of the model's tensors "
                         f"(e.g. {', '.join(sorted(missing)[:3])}), which would be random; the "
                         f"directory is incomplete or holds another model, re-save it with "
                         f"`save_pretrained`")
    return model


def wants_normalized_input(model_dir: Path, feat_extract_norm: str) -> bool:
    """Whether the model in `model_dir` takes zero-mean unit-variance waveforms: its
    `preprocessor_config.json`'s `do_normalize` (True when the file leaves it out, as for
    transformers' feature extractor), else whether its feature encoder uses layer norm (fairseq's
    HuBERT large recipes normalise, the base recipe does not)."""
    path = model_dir / "preprocessor_config.json"
    if not os.path.lexists(path):
        return feat_extract_norm == "layer"
    config = _read_json_object(path)
    setting = None if config is None else config.get("do_normalize", True)
    if not isinstance(setting, bool):
        raise ValueError(f"{path}: expected a JSON object whose do_normalize is true or false; "
                         f"the file is damaged: restore it, or delete it to decide from the "
                         f"model's feature encoder ({feat_extract_norm} norm)")
    return setting


class HubertFeatures:
    """16 kHz waveforms -> [num_units, hidden_size] float32 features of layer `layer`."""

    def __init__(self, model_dir: str | Path, layer: int = 6,
                 frame_rate: int = UNIT_FRAME_RATE, device: str = "cpu"):
        torch = require("torch", "HuBERT features")
        try:
            transformers = load_transformers()
        except ImportError:
            raise MissingDependencyError(
                "HuBERT features need the Python package 'transformers', which is not "
                "installed; install the audio extra: pip install 'megatron-lst[audio]'") from None
        model_dir = Path(model_dir)
        if model_dir.is_file():  # e.g. fairseq's hubert_base_ls960.pt, or the weights alone
            raise FileNotFoundError(
                f"{model_dir}: a file, not a Hugging Face model directory; a fairseq checkpoint "
                f"(.pt) converts with transformers' convert_hubert_original_pytorch_checkpoint_"
                f"to_pytorch.py (in its source repository), or take the Hugging Face release "
                f"(e.g. facebook/hubert-base-ls960) and pass the directory `save_pretrained` "
                f"writes")
        if not os.path.lexists(model_dir / "config.json"):  # not a regular file: refused by name
            raise FileNotFoundError(
                f"{model_dir}: not a Hugging Face model directory (no config.json); pass the "
                f"local directory of a HuBERT model (what `save_pretrained` writes)")
        self.model_dir, self.layer, self.frame_rate, self.device = model_dir, layer, frame_rate, device
        self._torch = torch
        model = _load_model(transformers, model_dir)
        self.model = model.eval().to(device)
        config = model.config
        if not 0 <= layer <= config.num_hidden_layers:
            raise ValueError(f"layer {layer} is outside 0..{config.num_hidden_layers} of the "
                             f"model in {model_dir}")
        self.downsampling = math.prod(config.conv_stride)
        if self.downsampling < 1:
            raise ValueError(f"{model_dir}: config.json gives conv_stride {config.conv_stride}, "
                             f"a downsampling of {self.downsampling}; the config is damaged, "
                             f"re-save the model with `save_pretrained`")
        native_rate = FEATURE_SAMPLE_RATE / self.downsampling
        if frame_rate < 1 or FEATURE_SAMPLE_RATE % (self.downsampling * frame_rate):
            raise ValueError(f"the model's frame rate ({native_rate:g} Hz: {self.downsampling}x "
                             f"downsampling at {FEATURE_SAMPLE_RATE} Hz) is not a whole multiple "
                             f"of the unit frame rate {frame_rate} Hz")
        self.group = FEATURE_SAMPLE_RATE // (self.downsampling * frame_rate)
        """Native frames averaged into one unit frame."""
        self.samples_per_unit = FEATURE_SAMPLE_RATE // frame_rate
        self.dim = config.hidden_size
        self._per_utterance_conv = config.feat_extract_norm == "group"
        self._stable_layer_norm = config.do_stable_layer_norm
        self.normalize = wants_normalized_input(model_dir, config.feat_extract_norm)
        """Each waveform goes in at zero mean and unit variance."""

    # Worker processes reload the model from its directory rather than unpickling it.
    def __getstate__(self) -> dict:
        return {"model_dir": self.model_dir, "layer": self.layer, "frame_rate": self.frame_rate,
                "device": self.device}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def cache_key(self) -> dict:
        """Everything that changes the features: the weights' files, the layer, the rate."""
        files = sorted(p for p in self.model_dir.iterdir() if p.is_file())
        return {"kind": "hubert", "path": str(self.model_dir.resolve()), "layer": self.layer,
                "frame_rate": self.frame_rate,
                "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}

    def num_units(self, num_samples: int) -> int:
        """Unit frames of an utterance of `num_samples` samples at 16 kHz."""
        return num_samples // self.samples_per_unit

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """[n] 16 kHz waveform -> [n // samples_per_unit, dim] (the demo corpus' interface)."""
        return self.batch([audio])[0]

    def batch(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """16 kHz waveforms [n_i] -> features [n_i // samples_per_unit, dim] each, float32."""
        torch = self._torch
        out: list[np.ndarray | None] = [None] * len(waves)
        todo = []
        for i, wave in enumerate(waves):
            if self.num_units(len(wave)) == 0:
                out[i] = np.zeros((0, self.dim), np.float32)
            else:
                todo.append(i)
        if todo:
            with torch.inference_mode():
                hidden, frames = self._layer_output([waves[i] for i in todo])  # [B, T, D], [B]
                hidden = hidden.float().cpu().numpy()
            for row, i in enumerate(todo):
                out[i] = self._pool(hidden[row, :frames[row]], self.num_units(len(waves[i])))
        return out

    def _conv_features(self, waves: list[np.ndarray]):
        """[B, T, C] convolutional features (zero past each utterance's end) and [B] lengths."""
        torch, model = self._torch, self.model
        if self.normalize:  # as Hugging Face's Wav2Vec2FeatureExtractor(do_normalize=True)
            waves = [(w - w.mean()) / np.sqrt(w.var() + 1e-7)
                     for w in (np.asarray(w, dtype=np.float64) for w in waves)]
        tensors = [torch.from_numpy(np.asarray(w, dtype=np.float32)).to(self.device)
                   for w in waves]
        lengths = model._get_feat_extract_output_lengths(
            torch.tensor([len(w) for w in waves])).tolist()
        if self._per_utterance_conv:
            convs = [model.feature_extractor(w[None])[0].transpose(0, 1) for w in tensors]
            conv = torch.nn.utils.rnn.pad_sequence(convs, batch_first=True)  # [B, T, C]
        else:
            padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)  # [B, n_max]
            conv = model.feature_extractor(padded).transpose(1, 2)  # [B, T, C]
        return conv, lengths

    def _layer_output(self, waves: list[np.ndarray]):
        """[B, T, D] output of layer `self.layer` and the [B] valid frame counts."""
        torch, model = self._torch, self.model
        conv, lengths = self._conv_features(waves)
        hidden = model.feature_projection(conv)  # [B, T, D]
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < torch.tensor(
            lengths, device=hidden.device)[:, None]  # [B, T]
        hidden = hidden.masked_fill(~valid[..., None], 0.0)
        # [B, 1, 1, T] additive key mask: padded frames are never attended to.
        key_mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        key_mask = key_mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None]
        encoder = model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not self._stable_layer_norm:
            hidden = encoder.layer_norm(hidden)
        for layer in encoder.layers[:self.layer]:
            hidden = layer(hidden, attention_mask=key_mask)
            if isinstance(hidden, tuple):  # transformers 4 layers return (hidden, attentions)
                hidden = hidden[0]
        return hidden, lengths

    def _pool(self, frames: np.ndarray, num_units: int) -> np.ndarray:
        """[T, D] native frames -> [num_units, D]: groups of `self.group` frames averaged."""
        need = num_units * self.group
        if len(frames) < need:
            frames = np.concatenate([frames, np.repeat(frames[-1:], need - len(frames), 0)])
        return frames[:need].reshape(num_units, self.group, -1).mean(1)
