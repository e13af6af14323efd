"""The autoencoder (a diffusers AutoencoderKL) that `train_autoencoder.py` trains.

presets.py  its shapes by name (`ae-digits`, `sd-vae`) and building one
method.py   the training loop's method: reconstruction + KL loss, held-out grids, the export
quality.py  PSNR and SSIM of reconstructions
"""
