"""Measurement tools: model_stats (parameters, GFLOPs, FPS, host syncs), train_memory, merge_speed,
ms_deform_attn_speed, compare_postprocessors, shapes_curve; results go to docs/BENCHMARKS.md."""
