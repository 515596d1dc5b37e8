import json

import pytest

from slmkd.config import (
    ENV_OVERRIDES,
    PROFILES,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    load_config,
)


def test_defaults_are_the_studys_stable_values():
    cfg = load_config(environ={})
    assert cfg.profile == "a100-80g"
    assert cfg.kd.temperature_schedule == [2.0, 1.5, 1.0]
    assert cfg.kd.alpha_schedule == [0.5, 0.4, 0.3]
    t = cfg.train
    assert (t.learning_rate, t.epochs, t.batch_size, t.grad_accum_steps) == (3e-5, 3, 4, 4)
    assert (t.clip_grad_norm, t.dataloader_num_workers, t.log_every) == (0.5, 2, 20)
    assert (cfg.kd.max_logit_abs, t.min_supervised_tokens, t.debug_nan) == (50.0, 8, False)
    assert cfg.seeds == [42, 123, 456]
    assert (cfg.evaluation.gsm8k_limit, cfg.evaluation.bbh_limit) == (500, 100)
    assert cfg.models.teacher_medium == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.models.student_primary == "Qwen/Qwen2.5-3B-Instruct"
    assert cfg.models.student_small == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.cascod.alpha_cascod == 0.1


def test_training_arguments_mapping_is_accepted_by_transformers(tmp_path):
    from transformers import TrainingArguments

    kwargs = load_config(environ={}).train.training_arguments_kwargs()
    kwargs["gradient_checkpointing"] = False
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    assert args.max_grad_norm == 0.5
    assert args.gradient_accumulation_steps == 4
    assert args.per_device_train_batch_size == 4


def test_profile_40g_keeps_the_effective_batch():
    a, b = load_config("a100-80g", environ={}), load_config("a100-40g", environ={})
    assert (b.train.batch_size, b.train.grad_accum_steps) == (4, 4)
    assert b.train.use_lora and not a.train.use_lora
    assert a.train.batch_size * a.train.grad_accum_steps == b.train.batch_size * b.train.grad_accum_steps


def test_profile_from_environment_and_argument_wins():
    assert load_config(environ={"SLMKD_PROFILE": "tiny"}).profile == "tiny"
    assert load_config("a100-40g", environ={"SLMKD_PROFILE": "tiny"}).profile == "a100-40g"
    tiny = load_config("tiny", environ={})
    assert tiny.models.teacher_medium.startswith("tiny-qwen2-")
    assert tiny.is_tiny


def test_unknown_profile():
    with pytest.raises(ConfigError, match="Unknown profile 'a100-20g'"):
        load_config("a100-20g", environ={})
    with pytest.raises(ConfigError, match="Unknown profile"):
        load_config(environ={"SLMKD_PROFILE": "nope"})


@pytest.mark.parametrize("name,raw,path,value", [
    ("SLM_KD_DEBUG_NAN", "1", "train.debug_nan", True),
    ("SLM_KD_DEBUG_NAN", "false", "train.debug_nan", False),
    ("SLM_KD_CLIP_GRAD_NORM", "1.5", "train.clip_grad_norm", 1.5),
    ("SLM_KD_MAX_LOGIT_ABS", "30", "kd.max_logit_abs", 30.0),
    ("SLM_KD_MIN_SUPERVISED_TOKENS", "16", "train.min_supervised_tokens", 16),
    ("SLM_KD_LOG_EVERY", "5", "train.log_every", 5),
])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_env_overrides_beat_every_profile_and_are_logged(name, raw, path, value, profile, caplog):
    with caplog.at_level("WARNING", logger="slmkd.config"):
        cfg = load_config(profile, overrides={path: "placeholder"} if False else None,
                          environ={name: raw})
    section, field = path.split(".")
    assert getattr(getattr(cfg, section), field) == value
    default = getattr(getattr(load_config(profile, environ={}), section), field)
    if default != value:
        assert path in caplog.text and "environment" in caplog.text


def test_env_overrides_beat_explicit_overrides_and_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"log_every": 7, "learning_rate": 1e-4}}))
    cfg = load_config("a100-80g", config_file=f, environ={"SLM_KD_LOG_EVERY": "3"})
    assert cfg.train.log_every == 3 and cfg.train.learning_rate == 1e-4
    assert set(ENV_OVERRIDES) == {"SLM_KD_DEBUG_NAN", "SLM_KD_CLIP_GRAD_NORM",
                                  "SLM_KD_MAX_LOGIT_ABS", "SLM_KD_MIN_SUPERVISED_TOKENS",
                                  "SLM_KD_LOG_EVERY"}


@pytest.mark.parametrize("name,raw", [("SLM_KD_DEBUG_NAN", "maybe"), ("SLM_KD_LOG_EVERY", "abc"),
                                      ("SLM_KD_CLIP_GRAD_NORM", "1,5"),
                                      ("SLM_KD_MIN_SUPERVISED_TOKENS", "2.5"),
                                      ("SLM_KD_MAX_LOGIT_ABS", "")])
def test_unparsable_env_value(name, raw):
    with pytest.raises(ConfigError, match=name):
        load_config(environ={name: raw})


@pytest.mark.parametrize("overrides,match", [
    ({"kd.temperature_schedule": [2.0, 1.0]}, "temperature_schedule has 2 values but train.epochs=3"),
    ({"kd.alpha_schedule": [0.5, 0.4]}, "alpha_schedule has 2 values"),
    ({"train.epochs": 2}, "one value per epoch"),
    ({"kd.alpha_schedule": [0.5, 1.2, 0.3]}, r"alpha_schedule\[1\]=1.2: alpha must lie in \[0, 1\]"),
    ({"kd.alpha_schedule": [-0.1, 0.4, 0.3]}, "alpha must lie in"),
    ({"kd.temperature_schedule": [2.0, 0.0, 1.0]}, "temperatures must be > 0"),
    ({"kd.temperature_schedule": [2.0, -1.0, 1.0]}, "temperatures must be > 0"),
    ({"cascod.alpha_cascod": 1.5}, "alpha_cascod"),
    ({"kd.max_logit_abs": 0}, "max_logit_abs"),
    ({"train.learning_rate": 0}, "learning_rate"),
    ({"train.batch_size": 0}, "batch_size"),
    ({"train.clip_grad_norm": -1}, "clip_grad_norm"),
    ({"train.min_supervised_tokens": -1}, "min_supervised_tokens"),
    ({"evaluation.gsm8k_limit": 0}, "gsm8k_limit"),
    ({"evaluation.datasets": ["mmlu"]}, "mmlu"),
    ({"generation.backend": "tgi"}, "backend"),
    ({"methods": ["distill"]}, "Unknown method"),
    ({"seeds": []}, "seeds must not be empty"),
    ({"seeds": [1, 1]}, "duplicates"),
    ({"train.epochs": 0}, "epochs must be >= 1"),
    ({"kd.chunk_size": 0}, "chunk_size"),
    ({"students": []}, "students"),
])
def test_validation_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("a100-80g", overrides=overrides, environ={})


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="Unknown config field 'train.lr'"):
        load_config(overrides={"train.lr": 1.0}, environ={})


def test_full_set_limits_are_allowed_and_schedules_follow_epochs():
    cfg = load_config(overrides={"evaluation.gsm8k_limit": None, "evaluation.bbh_limit": None,
                                 "train.epochs": 2, "kd.temperature_schedule": [3.0, 1.0],
                                 "kd.alpha_schedule": [0.9, 0.1]}, environ={})
    assert cfg.schedule_for_epoch(0) == (3.0, 0.9)
    assert cfg.schedule_for_epoch(1) == (1.0, 0.1)
    assert cfg.schedule_for_epoch(5) == (1.0, 0.1)  # past the end: last value


def test_save_roundtrip_and_fingerprint(tmp_path):
    cfg = load_config("a100-40g", environ={"SLM_KD_DEBUG_NAN": "1"})
    path = cfg.save(tmp_path / "run" / "config.json")
    data = json.loads(path.read_text())
    assert data["train"]["debug_nan"] is True and data["profile"] == "a100-40g"
    again = config_from_dict(data)
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert cfg.replace(**{"train.learning_rate": 1e-3}).fingerprint() != cfg.fingerprint()
    assert isinstance(again, ExperimentConfig)


def test_drive_root_from_environment():
    assert load_config(environ={"SLMKD_DRIVE_ROOT": "/x/y"}).drive_root == "/x/y"
    cfg = load_config(overrides={"drive_root": "/a"}, environ={"SLMKD_DRIVE_ROOT": "/x/y"})
    assert cfg.drive_root == "/a"
