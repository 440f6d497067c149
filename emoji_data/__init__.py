"""The emoji data set the bundled model is trained on: `python -m emoji_data.build` downloads the emoji
packages (`sources`) and writes a captioned image folder."""
