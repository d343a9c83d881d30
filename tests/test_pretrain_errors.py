"""Configs and inputs that cannot train fail before any worker starts, naming the field and the fix."""

import pytest

from raytrain.cli import main
from raytrain.data.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.ray


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.d_model=30"], "'model.d_model' 30 is not divisible by model.n_heads 4"),
        (["model.n_kv_heads=3"], "'model.n_heads' 4 is not divisible by model.n_kv_heads 3"),
        (["model.max_seq_len=16"], "'model.max_seq_len' is 16 but the data's rows hold 32 tokens"),
        (["model.vocab_size=100"], "'model.vocab_size' is 100 but the data's tokenizer has 512"),
        (["train.global_batch=6", "parallel.workers=4"], "'train.global_batch' 6 is not divisible by data-parallel"),
        (["parallel.workers=64", "train.global_batch=64"], "need 64 CPUs but the cluster has"),
        (["parallel.use_gpu=true", "runtime.resource_wait_s=1"], "need 1 GPUs but the cluster has 0 after waiting 1s"),
        (["parallel.workers=4", "parallel.tp=4"], "model.n_kv_heads=2 is not divisible by parallel.tp=4"),
        (["parallel.workers=3", "parallel.dp_shard=2"], "'parallel.workers' 3 differs from pp × dp_replicate"),
    ],
)
def test_bad_training_config(capsys, ray_session, tiny_dataset, tmp_path, overrides, fragment):
    code = main(["pretrain", "--config", "tiny", "--data", str(tiny_dataset), f"run.root={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "tiny" / "checkpoints").exists()


def test_data_that_is_not_prepared(capsys, tmp_path):
    code = main(["pretrain", "--config", "tiny", "--data", str(tmp_path), f"run.root={tmp_path}"])
    assert code == 2 and "is not a prepared dataset (no manifest.json)" in capsys.readouterr().err


def test_data_prepared_with_another_tokenizer(capsys, tiny_dataset, tmp_path):
    other = tmp_path / "other-tokenizer"
    save_tokenizer(train_tokenizer(["some other text entirely"] * 10, vocab_size=300), other, {})
    code = main(["pretrain", "--config", "tiny", "--data", str(tiny_dataset), f"train.tokenizer={other}",
                 f"run.root={tmp_path}"])
    assert code == 2 and "was prepared with another tokenizer" in capsys.readouterr().err
