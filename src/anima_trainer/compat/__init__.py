"""Compatibility front-ends: other tools' names and file formats translated into anima-trainer's own.

What it holds: `dropin` (the `anima_train_network.py` drop-in for kohya's command line), `convert_root` and
`convert_files` (the root-style Anima_Trainer TOML → train.toml + dataset.toml), `folders` (kohya's
`<N>_<name>` image-folder layouts), and the generators of the documentation tables of these surfaces:
`option_table` (docs/migration.md, every kohya / sd-scripts-anima option) and `reference`
(docs/config_reference.md, every setting and dataset.toml key).

Direction: compat imports config (and data, for folder layouts and the dataset check); config never imports
compat.  The kohya option *table* itself (`config/kohya_options.py`: aliases, renamed keys, the accepted-inert
and refused options) is torch-free data that config's loader needs to accept kohya's names, so it stays in
config; compat only renders it.
"""
