"""From recorded speech to training data: audio reading, HuBERT features, k-means units.

- `audio_io`: wav/flac reading and resampling to 16 kHz;
- `corpus`: utterance lists of the common corpus layouts (LibriSpeech/MLS transcripts, a TSV);
- `hubert`: batched features of one layer of a local Hugging Face HuBERT model, at 25 Hz;
- `codebook`: k-means centroids saved and loaded without pickle;
- `units_record`: the `units.json` beside unit files, and its check before preprocessing;
- `extract`: the resumable, multi-process unit extraction behind `tools/extract_units.py`;
- `cli_args`: the arguments that tool shares with `tools/train_kmeans.py`.

See docs/audio.md for the recipe from audio to indexed datasets.
"""
