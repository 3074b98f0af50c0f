"""Images to model-ready pixels: preprocessing (`preprocess`), CPU decode (`decode`), a decode
worker's unit of work (`load`), and JPEG decode on the GPU (`gpu`).
"""
