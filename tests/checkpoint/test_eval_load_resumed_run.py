"""`lst-eval`/`lst-generate` load the checkpoint whose configuration they read, whatever flags the
run that saved it had: a run resumed with `--ckpt-step N` saves `ckpt_step: N` among its flags,
and the evaluation, which takes the saved flags as its own, loaded the weights of iteration N into
the model of the latest checkpoint and reported them as the latest's."""

import torch

from megatron_lst.checkpoint.dist import save_dist_checkpoint, training_args_for
from megatron_lst.checkpoint.model_state import build_full_model
from megatron_lst.evaluation.loading import load_inference_model
from megatron_lst.models.config import preset
from megatron_lst.parallel import destroy_parallel, initialize_parallel
from megatron_lst.tokenizer.vocab import JointVocab

VOCAB = JointVocab(text_size=512)  # the fixtures' spm.model


def test_the_latest_checkpoint_of_a_resumed_run_is_the_one_loaded(reference_fixtures, tmp_path):
    initialize_parallel(seed=1)
    try:
        config = preset("tiny", VOCAB.size)
        args = training_args_for(config)
        torch.manual_seed(1)
        save_dist_checkpoint(tmp_path, build_full_model(config), args, VOCAB, 1)
        torch.manual_seed(2)
        latest = build_full_model(config)
        save_dist_checkpoint(tmp_path, latest, {**args, "ckpt_step": 1}, VOCAB, 2)

        loaded = load_inference_model(tmp_path,
                                      tokenizer_model=str(reference_fixtures / "spm.model"))
        assert (loaded.checkpoint.name, loaded.iteration) == ("iter_0000002", 2)
        weights = loaded.model_chunks[0].state_dict()
        assert all(torch.equal(weights[name], tensor)
                   for name, tensor in latest.state_dict().items()
                   if not name.endswith("_extra_state"))
    finally:
        destroy_parallel()


def test_a_checkpoint_saved_while_loading_does_not_replace_the_one_read(reference_fixtures,
                                                                         tmp_path, monkeypatch):
    """A training run still saving into the directory: the model was built from the
    configuration of one checkpoint and loaded the weights of the next."""
    import megatron_lst.training.model_provider as model_provider

    initialize_parallel(seed=1)
    try:
        config = preset("tiny", VOCAB.size)
        args = training_args_for(config)
        torch.manual_seed(1)
        read = build_full_model(config)
        save_dist_checkpoint(tmp_path, read, args, VOCAB, 1)
        build = model_provider.build_model_chunks

        def build_while_training_saves(*arguments, **options):
            built = build(*arguments, **options)
            torch.manual_seed(2)
            save_dist_checkpoint(tmp_path, build_full_model(config), args, VOCAB, 2)
            return built

        monkeypatch.setattr(model_provider, "build_model_chunks", build_while_training_saves)
        loaded = load_inference_model(tmp_path,
                                      tokenizer_model=str(reference_fixtures / "spm.model"))
        assert (loaded.checkpoint.name, loaded.iteration) == ("iter_0000001", 1)
        weights = loaded.model_chunks[0].state_dict()
        assert all(torch.equal(weights[name], tensor)
                   for name, tensor in read.state_dict().items()
                   if not name.endswith("_extra_state"))
    finally:
        destroy_parallel()
