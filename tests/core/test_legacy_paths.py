"""The module paths of mtl before its layered layout stay importable, with every public name they had, so that
plugins and scripts written for them keep working (mtl/core/legacy.py)."""
import importlib

import pytest

# every public module-level name of these modules at commit cd91a8e (the last flat layout)
OLD_NAMES = {
    "mtl.errors": ['UserError', 'out_of_memory'],
    "mtl.registry": ['Registry'],
    "mtl.distributed": ['world_size', 'rank', 'is_main', 'init_from_env', 'local_device', 'all_reduce_mean_', 'all_reduce_sum', 'global_mean', 'broadcast_object', 'on_main', 'barrier', 'shutdown'],
    "mtl.checkpoint": ['TEMP_SUFFIX', 'NO_SPACE', 'NOT_WRITABLE', 'Hint', 'writing', 'atomic_write', 'remove_temporaries', 'save_checkpoint', 'save_json', 'load_checkpoint', 'load_torch_file', 'rng_state', 'set_rng_state'],
    "mtl.rundir": ['LOCK_NAME', 'make_run_dir', 'RunLock', 'lock_run_dir', 'check_not_in_use', 'resume_hint', 'no_checkpoint_yet'],
    "mtl.schema": ['IMAGENET_MEAN', 'IMAGENET_STD', 'AUGMENTATIONS', 'FreezeSpec', 'DEVICES', 'bounded', 'name_problem', 'DataCfg', 'HeadCfg', 'TaskCfg', 'ModelCfg', 'OptimCfg', 'SchedCfg', 'WeightingCfg', 'UnfreezeCfg', 'TrainCfg', 'CONTINUAL_METHODS', 'ContinualCfg', 'Config'],
    "mtl.config": ['Sources', 'load_yaml', 'load_config', 'parse_override', 'deep_merge', 'record_sources', 'yaml_problem', 'build_config', 'config_to_dict', 'dump_config'],
    "mtl.encoders": ['ENCODERS', 'torchvision_names', 'encoder_names', 'build_encoder', 'stage_nodes', 'TorchvisionEncoder', 'torchvision_encoder', 'fixed_input_size', 'tokens_to_map', 'probe_feature_info', 'smallest_input_size', 'input_size_problem', 'check_input_size', 'SmallCNN'],
    "mtl.weights": ['load_weights', 'cache_dir', 'torchvision_weights', 'torchvision_state_dict', 'run_checkpoint', 'read_state_dict', 'fit_state_dict', 'known_weight_files', 'import_weights', 'list_cached', 'format_cached_table'],
    "mtl.heads": ['HEADS', 'NORMS', 'PooledHead', 'check_options', 'linear_head', 'mlp_head', 'GridHead', 'grid_head', 'norm_layer', 'conv_norm_relu', 'FPNHead', 'fpn_head', 'ASPPHead', 'aspp_head'],
    "mtl.mtan": ['StageAttention', 'MTAN'],
    "mtl.freezing": ['matches', 'frozen_names', 'apply_freeze', 'set_trainable', 'check_unfreeze', 'eval_frozen', 'freeze_norm_stats', 'L2SP'],
    "mtl.progressive": ['SUPPORTED', 'split_stages', 'LateralAdapter', 'LinearLateral', 'Column', 'ProgressiveNet', 'ColumnView'],
    "mtl.model": ['TransferModel'],
    "mtl.tasks": ['TASK_TYPES', 'LOSSES', 'METRICS', 'Task', 'Classification', 'Binary', 'Multilabel', 'Regression', 'Segmentation', 'Depth', 'Normals', 'task_options', 'num_outputs_required', 'build_task', 'probabilities', 'use_custom_loss', 'add_custom_metrics'],
    "mtl.trainer": ['Hook', 'Trainer', 'STOP_SIGNALS', 'stop_signals_blocked', 'ignore_stop_signals', 'default_monitor'],
    "mtl.hooks": ['UnfreezeHook', 'CheckpointHook', 'MetricsFileHook', 'ConsoleHook', 'TensorBoardHook'],
    "mtl.evaluate": ['Evaluation', 'confusion_tasks', 'evaluate', 'eval_command'],
    "mtl.optim": ['OPTIMIZERS', 'SCHEDULES', 'lr_mult_of', 'param_groups', 'build_optimizer', 'lr_factor', 'build_scheduler', 'add_param_group'],
    "mtl.features": ['feature_cache_blocker', 'HeadsOnFeatures', 'encode_all', 'FeatureBatches', 'cache_features'],
    "mtl.visualize": ['titled_grid', 'prediction_grid', 'palette', 'colormap', 'dense_overlay', 'confusion_image', 'confusion_text', 'text_table'],
    "mtl.compare": ['Metrics', 'delta_m', 'load_baseline', 'find_runs', 'run_metrics', 'run_directions', 'compare_table', 'write_baseline'],
    "mtl.experiment": ['seed_everything', 'select_device', 'use_amp', 'build_dataset', 'SignalSafeLoader', 'Experiment', 'build_data', 'build_experiment', 'check_data_size', 'parameter_counts', 'build_tasks', 'build_model', 'build_monitor', 'new_run_dir', 'run', 'in_order', 'stage_configs', 'run_stages', 'stage_table', 'train_from_file', 'resume_run', 'import_config_modules', 'check_resumable'],
    "mtl.continual": ['SequenceTask', 'Learner', 'ColumnLearner', 'SharedEncoderLearner', 'build_learner', 'evaluate', 'continual_metrics', 'results_table', 'matrix_table', 'as_sequence_stage', 'stage_model', 'prepare_sequence', 'run_continual'],
    "mtl.runs": ['Loaded', 'task_targets', 'is_run_dir', 'load_model', 'model_input_size', 'image_tensor'],
    "mtl.predict": ['BATCH', 'GRID_IMAGES', 'OUT_HINT', 'open_run', 'find_images', 'predict_images', 'predict_command'],
    "mtl.inspection": ['evaluating', 'format_output', 'parse_input', 'summary_table', 'summary_command', 'select_modules', 'feature_grid', 'features_command'],
    "mtl.plugins": ['import_modules'],
}


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_old_module_path_still_gives_every_name_it_had(module):
    old = importlib.import_module(module)
    missing = [name for name in OLD_NAMES[module] if not hasattr(old, name)]
    assert not missing, f"{module} lost {missing}"


def test_old_and_new_paths_give_the_same_objects():
    from mtl.engine import trainer
    from mtl.models import heads
    from mtl.heads import HEADS
    from mtl.trainer import Trainer

    assert Trainer is trainer.Trainer and HEADS is heads.HEADS


def test_a_name_that_never_existed_is_an_attribute_error():
    import mtl.trainer

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        mtl.trainer.NoSuchThing
