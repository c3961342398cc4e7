"""Every option AUTOMATIC1111 1.10 lists in GET /sdapi/v1/options, with its default (modules/shared_options.py
and the built-in Lora extension), and the bounds of those its settings page shows as sliders.

Data only: options.py validates values against these defaults' types and the ranges, and says which ones
sdstudio acts on. Options whose default depends on A1111's install folder (outdir_*) give A1111's relative
defaults; they are read back but never used as paths (nothing reachable over HTTP names a file).
"""

from __future__ import annotations

from typing import Any

_OUT = "outputs"

DEFAULTS: dict[str, Any] = {
    # saving images/grids
    "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
    "save_images_replace_action": "Replace", "grid_save": True, "grid_format": "png", "grid_extended_filename": False,
    "grid_only_if_multiple": True, "grid_prevent_empty_spots": False, "grid_zip_filename_pattern": "", "n_rows": -1,
    "font": "", "grid_text_active_color": "#000000", "grid_text_inactive_color": "#999999",
    "grid_background_color": "#ffffff", "save_images_before_face_restoration": False,
    "save_images_before_highres_fix": False, "save_images_before_color_correction": False, "save_mask": False,
    "save_mask_composite": False, "jpeg_quality": 80, "webp_lossless": False, "export_for_4chan": True,
    "img_downscale_threshold": 4.0, "target_side_length": 4000, "img_max_size_mp": 200,
    "use_original_name_batch": True, "use_upscaler_name_as_suffix": False, "save_selected_only": True,
    "save_write_log_csv": True, "save_init_img": False, "temp_dir": "", "clean_temp_dir_at_start": False,
    "save_incomplete_images": False, "notification_audio": True, "notification_volume": 100,
    # paths for saving
    "outdir_samples": "", "outdir_txt2img_samples": f"{_OUT}/txt2img-images",
    "outdir_img2img_samples": f"{_OUT}/img2img-images", "outdir_extras_samples": f"{_OUT}/extras-images",
    "outdir_grids": "", "outdir_txt2img_grids": f"{_OUT}/txt2img-grids",
    "outdir_img2img_grids": f"{_OUT}/img2img-grids",
    "outdir_save": "log/images", "outdir_init_images": f"{_OUT}/init-images",
    # saving to a directory
    "save_to_dirs": True, "grid_save_to_dirs": True, "use_save_to_dirs_for_ui": False,
    "directories_filename_pattern": "[date]", "directories_max_prompt_words": 8,
    # upscaling
    "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
    "dat_enabled_models": ["DAT x2", "DAT x3", "DAT x4"], "DAT_tile": 192, "DAT_tile_overlap": 8,
    "upscaler_for_img2img": None, "set_scale_by_when_changing_upscaler": False,
    # face restoration
    "face_restoration": False, "face_restoration_model": "CodeFormer", "code_former_weight": 0.5,
    "face_restoration_unload": False,
    # system
    "auto_launch_browser": "Local", "enable_console_prompts": False, "show_warnings": False,
    "show_gradio_deprecation_warnings": True, "memmon_poll_rate": 8, "samples_log_stdout": False,
    "multiple_tqdm": True, "enable_upscale_progressbar": True, "print_hypernet_extra": False,
    "list_hidden_files": True, "disable_mmap_load_safetensors": False, "hide_ldm_prints": True,
    "dump_stacks_on_signal": False,
    # profiler
    "profiling_enable": False, "profiling_activities": ["CPU"], "profiling_record_shapes": True,
    "profiling_profile_memory": True, "profiling_with_stack": True, "profiling_filename": "trace.json",
    # API
    "api_enable_requests": True, "api_forbid_local_requests": True, "api_useragent": "",
    # training
    "unload_models_when_training": False, "pin_memory": False, "save_optimizer_state": False,
    "save_training_settings_to_txt": True, "dataset_filename_word_regex": "", "dataset_filename_join_string": " ",
    "training_image_repeats_per_epoch": 1, "training_write_csv_every": 500, "training_xattention_optimizations": False,
    "training_enable_tensorboard": False, "training_tensorboard_save_images": False,
    "training_tensorboard_flush_every": 120,
    # stable diffusion
    "sd_model_checkpoint": None, "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0, "sd_unet": "Automatic", "enable_quantization": False, "emphasis": "Original",
    "enable_batch_seeds": True, "comma_padding_backtrack": 20, "sdxl_clip_l_skip": False,
    "CLIP_stop_at_last_layers": 1, "upcast_attn": False, "randn_source": "GPU", "tiling": False,
    "hires_fix_refiner_pass": "second pass",
    # stable diffusion XL, 3
    "sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0, "sd3_enable_t5": False,
    # VAE
    "sd_vae_checkpoint_cache": 0, "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences": True,
    "auto_vae_precision_bfloat16": False, "auto_vae_precision": True, "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
    # img2img
    "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "img2img_extra_noise": 0.0,
    "img2img_color_correction": False, "img2img_fix_steps": False, "img2img_background_color": "#ffffff",
    "img2img_editor_height": 720, "img2img_sketch_default_brush_color": "#ffffff",
    "img2img_inpaint_mask_brush_color": "#ffffff", "img2img_inpaint_sketch_default_brush_color": "#ffffff",
    "return_mask": False, "return_mask_composite": False, "img2img_batch_show_results_limit": 32,
    "overlay_inpaint": True,
    # optimizations
    "cross_attention_optimization": "Automatic", "s_min_uncond": 0.0, "s_min_uncond_all": False,
    "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0,
    "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "persistent_cond_cache": True, "batch_cond_uncond": True,
    "fp8_storage": "Disable", "cache_fp16_weight": False,
    # compatibility
    "auto_backcompat": True, "use_old_emphasis_implementation": False, "use_old_karras_scheduler_sigmas": False,
    "no_dpmpp_sde_batch_determinism": False, "use_old_hires_fix_width_height": False,
    "hires_fix_use_firstpass_conds": False, "use_old_scheduling": False, "use_downcasted_alpha_bar": False,
    "refiner_switch_by_sample_steps": False,
    # interrogate
    "interrogate_keep_models_in_memory": False, "interrogate_return_ranks": False, "interrogate_clip_num_beams": 1,
    "interrogate_clip_min_length": 24, "interrogate_clip_max_length": 48, "interrogate_clip_dict_limit": 1500,
    "interrogate_clip_skip_categories": [], "interrogate_deepbooru_score_threshold": 0.5, "deepbooru_sort_alpha": True,
    "deepbooru_use_spaces": True, "deepbooru_escape": True, "deepbooru_filter_tags": "",
    # extra networks
    "extra_networks_show_hidden_directories": True, "extra_networks_dir_button_function": False,
    "extra_networks_hidden_models": "When searched", "extra_networks_default_multiplier": 1.0,
    "extra_networks_card_width": 0, "extra_networks_card_height": 0, "extra_networks_card_text_scale": 1.0,
    "extra_networks_card_show_desc": True, "extra_networks_card_description_is_html": False,
    "extra_networks_card_order_field": "Path", "extra_networks_card_order": "Ascending",
    "extra_networks_tree_view_style": "Dirs", "extra_networks_tree_view_default_enabled": True,
    "extra_networks_tree_view_default_width": 180, "extra_networks_add_text_separator": " ",
    "ui_extra_networks_tab_reorder": "", "textual_inversion_print_at_load": False,
    "textual_inversion_add_hashes_to_infotext": True, "sd_hypernetwork": "None",
    # prompt editing, gallery, UI alternatives, UI
    "keyedit_precision_attention": 0.1, "keyedit_precision_extra": 0.05, "keyedit_delimiters": ".,\\/!?%^*;:{}=`~() ",
    "keyedit_delimiters_whitespace": ["Tab", "Carriage Return", "Line Feed"], "keyedit_move": True,
    "disable_token_counters": False, "include_styles_into_token_counters": True, "return_grid": True,
    "do_not_show_images": False, "js_modal_lightbox": True, "js_modal_lightbox_initially_zoomed": True,
    "js_modal_lightbox_gamepad": False, "js_modal_lightbox_gamepad_repeat": 250,
    "sd_webui_modal_lightbox_icon_opacity": 1.0, "sd_webui_modal_lightbox_toolbar_opacity": 0.9, "gallery_height": "",
    "open_dir_button_choice": "Subdirectory", "compact_prompt_box": False, "samplers_in_dropdown": True,
    "dimensions_and_batch_together": True, "sd_checkpoint_dropdown_use_short": False, "hires_fix_show_sampler": False,
    "hires_fix_show_prompts": False, "txt2img_settings_accordion": False, "img2img_settings_accordion": False,
    "interrupt_after_current": True, "localization": "None", "quicksettings_list": ["sd_model_checkpoint"],
    "ui_tab_order": [], "hidden_tabs": [], "ui_reorder_list": [], "gradio_theme": "Default",
    "gradio_themes_cache": True, "show_progress_in_title": True, "send_seed": True, "send_size": True,
    "enable_reloading_ui_scripts": False,
    # infotext
    "enable_pnginfo": True, "save_txt": False, "add_model_name_to_info": True, "add_model_hash_to_info": True,
    "add_vae_name_to_info": True, "add_vae_hash_to_info": True, "add_user_name_to_info": False,
    "add_version_to_infotext": True, "disable_weights_auto_swap": True, "infotext_skip_pasting": [],
    "infotext_styles": "Apply if any",
    # live previews
    "show_progressbar": True, "live_previews_enable": True, "live_previews_image_format": "png",
    "show_progress_grid": True, "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN",
    "live_preview_allow_lowvram_full": False, "live_preview_content": "Prompt", "live_preview_refresh_period": 1000,
    "live_preview_fast_interrupt": False, "js_live_preview_in_modal_lightbox": False,
    "prevent_screen_sleep_during_generation": True,
    # sampler parameters
    "hide_samplers": [], "eta_ddim": 0.0, "eta_ancestral": 1.0, "ddim_discretize": "uniform", "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "eta_noise_seed_delta": 0, "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3, "uni_pc_lower_order_final": True,
    "sd_noise_schedule": "Default", "skip_early_cond": 0.0, "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
    # postprocessing
    "postprocessing_enable_in_main_ui": [], "postprocessing_disable_in_extras": [],
    "postprocessing_operation_order": [], "upscaling_max_images_in_cache": 5,
    "postprocessing_existing_caption_action": "Ignore",
    # hidden
    "disabled_extensions": [], "disable_all_extensions": "none", "restore_config_state_file": "",
    "sd_checkpoint_hash": "",
    # the built-in Lora extension
    "sd_lora": "None", "lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True,
    "lora_bundled_ti_to_infotext": True, "lora_show_all": False, "lora_hide_unknown_for_versions": [],
    "lora_in_memory_limit": 0, "lora_not_found_warning_console": False, "lora_not_found_gradio_warning": False,
}

# (minimum, maximum) of options A1111 shows as sliders; a value outside is refused.
RANGES: dict[str, tuple[float, float]] = {
    "n_rows": (-1, 16), "jpeg_quality": (1, 100), "notification_volume": (0, 100),
    "directories_max_prompt_words": (1, 20), "ESRGAN_tile": (0, 512), "ESRGAN_tile_overlap": (0, 48),
    "DAT_tile": (0, 512), "DAT_tile_overlap": (0, 48), "code_former_weight": (0, 1), "memmon_poll_rate": (0, 40),
    "sd_checkpoints_limit": (1, 10), "sd_checkpoint_cache": (0, 10), "comma_padding_backtrack": (0, 74),
    "CLIP_stop_at_last_layers": (1, 12), "sd_vae_checkpoint_cache": (0, 10), "inpainting_mask_weight": (0, 1),
    "initial_noise_multiplier": (0, 1.5), "img2img_extra_noise": (0, 1), "img2img_editor_height": (80, 1600),
    "img2img_batch_show_results_limit": (-1, 1000), "s_min_uncond": (0, 15), "token_merging_ratio": (0, 0.9),
    "token_merging_ratio_img2img": (0, 0.9), "token_merging_ratio_hr": (0, 0.9), "interrogate_clip_num_beams": (1, 16),
    "interrogate_clip_min_length": (1, 128), "interrogate_clip_max_length": (1, 256),
    "interrogate_deepbooru_score_threshold": (0, 1), "extra_networks_default_multiplier": (0, 2),
    "extra_networks_card_text_scale": (0, 2), "keyedit_precision_attention": (0.01, 0.2),
    "keyedit_precision_extra": (0.01, 0.2), "sd_webui_modal_lightbox_icon_opacity": (0, 1),
    "sd_webui_modal_lightbox_toolbar_opacity": (0, 1), "show_progress_every_n_steps": (-1, 32),
    "eta_ddim": (0, 1), "eta_ancestral": (0, 1), "s_churn": (0, 100), "s_tmin": (0, 10), "s_tmax": (0, 999),
    "s_noise": (0, 1.1), "uni_pc_order": (1, 50), "skip_early_cond": (0, 1), "beta_dist_alpha": (0.01, 1),
    "beta_dist_beta": (0.01, 1), "upscaling_max_images_in_cache": (0, 10),
    # gr.Number fields A1111 leaves open; bounded here so a value can never overflow what reads it
    "eta_noise_seed_delta": (0, 2**32 - 1), "sdxl_crop_top": (0, 8192), "sdxl_crop_left": (0, 8192),
    "sdxl_refiner_low_aesthetic_score": (0, 10), "sdxl_refiner_high_aesthetic_score": (0, 10),
    "sigma_min": (0, 1000), "sigma_max": (0, 1000), "rho": (0, 100),
}

# The choices of options sdstudio acts on whose value is one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "samples_format": ("png", "jpg", "jpeg", "webp"),
    "sd_noise_schedule": ("Default", "Zero Terminal SNR"),
    "emphasis": ("Original", "None", "Ignore", "No norm"),
    "randn_source": ("GPU", "CPU", "NV"),
}

# A1111 refuses to change these over the API (restrict_api): they govern what the server fetches.
RESTRICTED = frozenset({"api_enable_requests", "api_forbid_local_requests", "api_useragent"})
