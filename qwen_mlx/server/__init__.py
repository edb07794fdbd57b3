"""``qwen-mlx serve``: one resident pipeline behind the OpenAI Images and AUTOMATIC1111 APIs,
with a web page. Needs the ``server`` extra (FastAPI, uvicorn, python-multipart)."""
