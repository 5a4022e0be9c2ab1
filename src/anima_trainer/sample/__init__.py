"""Images from the model: the flow sampler as ComfyUI runs it, and the previews training draws.

    generate.py  text → image with the full stack: encode prompts, sample, decode, save PNG with parameters
    prompts.py   kohya's sample-prompt files (.txt with ` --x value` options, .toml, .json)
    sampler.py   shift-3 sigma table, `simple` schedule, flow Euler, CFG
"""
