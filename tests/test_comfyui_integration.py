"""The plugin inside a real ComfyUI server (CPU): import, /object_info, the shipped workflows, and the sampler
on the Ray worker pool against the CLI, warm reuse, and cancel.

Runs only with COMFYUI_PATH (a ComfyUI checkout). Its Python: $COMFYUI_PYTHON, else
<COMFYUI_PATH>/../comfy-venv/bin/python when present, else this interpreter; it needs ComfyUI's and our
requirements. Everything else lives in a temporary --base-directory: custom_nodes/comfyui-xdit is a symlink
to this repository, next to a test-only node that makes CONDITIONING from a seed; the checkout is not touched.
"""
import base64
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_workflows import (CORE_NODES, NEEDS_NEWER_COMFYUI, UI_FILES, WIDGET_TYPES, WORKFLOWS, newer_comfyui_lacks,
                            our_signature)

ROOT = Path(__file__).resolve().parent.parent
COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
OURS = {"XDiTLoadModel": "xDiT Load Diffusion Model", "XDiTParallelMesh": "xDiT Parallel Mesh",
        "XDiTSampler": "xDiT Sampler", "XDiTSamplerAdvanced": "xDiT Sampler (Advanced)", "XDiTLoRA": "xDiT LoRA",
        "XDiTSamplingModel": "xDiT Model for ComfyUI Samplers", "XDiTGuider": "xDiT Guider",
        "XDiTUnload": "xDiT Unload"}
TINY = "diffusers/tiny-flux"
COND = dict(length=9, width=32, pooled=32)  # the tiny Flux's T5 and CLIP widths
GUIDANCE, CFG, STEPS = 2.5, 2.0, 4

HELPER = '''
"""Test-only (never shipped): CONDITIONING of random tensors from a seed, also saved to the output folder."""
import os

import folder_paths
import torch
from safetensors.torch import save_file


class XDiTTestConditioning:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        n = {"default": 1, "min": 1, "max": 4096}
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}), "length": ("INT", n),
                             "width": ("INT", n), "pooled": ("INT", n)}}

    def make(self, seed, length, width, pooled):
        gen = torch.Generator().manual_seed(seed)
        text, pooled_output = torch.randn(1, length, width, generator=gen), torch.randn(1, pooled, generator=gen)
        os.makedirs(folder_paths.get_output_directory(), exist_ok=True)
        save_file({"text": text, "pooled": pooled_output},
                  os.path.join(folder_paths.get_output_directory(), f"xdit_test_cond_{seed}.safetensors"))
        return ([[text, {"pooled_output": pooled_output}]],)


NODE_CLASS_MAPPINGS = {"XDiTTestConditioning": XDiTTestConditioning}
'''


def comfy_python():
    """ComfyUI's interpreter, or None when it lacks ComfyUI's or our requirements."""
    python = os.environ.get("COMFYUI_PYTHON")
    if not python:
        venv = Path(COMFYUI).resolve().parent / "comfy-venv" / "bin" / "python"
        python = str(venv) if venv.is_file() else sys.executable
    if not Path(python).is_file():
        return None
    check = subprocess.run([python, "-c", "import aiohttp, yaml, torch, safetensors, diffusers, ray"],
                           capture_output=True)
    return python if check.returncode == 0 else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_map():
    """{ppid: [pid, ...]} of every process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid):
    kids, todo, found = children_map(), [pid], []
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cpu_seconds(pids):
    """User + system CPU time of `pids` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """A ComfyUI server in a temporary base directory."""

    def __init__(self, python, base):
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        env = {k: v for k, v in os.environ.items() if k not in ("XDIT_RAY_ADDRESS", "RAY_ADDRESS")}
        env["HF_HUB_OFFLINE"] = "1"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
             "--preview-method", "latent2rgb",
             "--cache-none", "--base-directory", str(base), "--database-url", "sqlite:///" + str(base / "comfyui.db")],
            cwd=COMFYUI, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not start:\n{self.log_text()[-3000:]}")
                time.sleep(0.5)

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_raw(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            return json.loads(e.read())
        return json.loads(text) if text.strip() else {}

    def queue(self, prompt, client_id=None):
        """POST /prompt; returns the prompt id (fails on validation errors)."""
        body = {"prompt": prompt, **({"client_id": client_id} if client_id else {})}
        answer = self.post("/prompt", body)
        assert "prompt_id" in answer and not answer.get("node_errors"), answer
        return answer["prompt_id"]

    def wait(self, prompt_id, timeout=120):
        """The /history entry of a finished prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # written when the prompt is done, whatever the outcome
                return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_text()[-3000:]}")

    def rank_workers(self):
        """PIDs of the Ray rank actors under this server."""
        return sorted(p for p in descendants(self.proc.pid) if cmdline(p).startswith("ray::RankWorker"))

    def stop(self):
        """Stop the server and every process under it (Ray's too); returns those still alive."""
        if self.proc.poll() is None:
            tree = descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 2)):  # Ray's processes outlive it
                for pid in tree:
                    if alive(pid):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            pass
                deadline = time.monotonic() + grace
                while any(alive(p) for p in tree) and time.monotonic() < deadline:
                    time.sleep(0.1)
            self.leftover = [p for p in tree if alive(p)]
        self.log.close()
        return getattr(self, "leftover", [])


class WebSocket:
    """The few bytes of RFC 6455 needed to read ComfyUI's JSON messages (client side, no extensions)."""

    def __init__(self, port, client_id):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.messages = queue.Queue()
        self.binary = queue.Queue()  # previews: a 4-byte event type, then the image (with its type)
        threading.Thread(target=self._reader, daemon=True).start()

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _reader(self):
        try:
            while True:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                payload = self._read(n)
                if b0 & 0x0F == 1:  # text: ComfyUI's JSON messages; binary ones are previews
                    self.messages.put(json.loads(payload))
                elif b0 & 0x0F == 2:
                    self.binary.put(payload)
                elif b0 & 0x0F == 8:
                    return
        except (OSError, EOFError):
            return

    def next(self, timeout):
        return self.messages.get(timeout=timeout)

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = comfy_python()
    if python is None:
        pytest.skip("no Python with ComfyUI's and comfyui-xdit's requirements (set COMFYUI_PYTHON)")
    if not (Path(COMFYUI) / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={COMFYUI} has no main.py")
    from xdit_core.cli.preview import write_png
    from xdit_core.cli.tiny import write_tiny

    base = tmp_path_factory.mktemp("comfy_base")
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / "comfyui-xdit").symlink_to(ROOT, target_is_directory=True)
    (nodes_dir / "xdit_test_helper.py").write_text(HELPER)
    write_tiny("flux", base / "models" / TINY, seed=1)
    # Empty stand-ins for every file the shipped workflows name, so ComfyUI can validate them.
    for path in UI_FILES:
        for n in json.loads((WORKFLOWS / "api" / path.name).read_text()).values():
            inputs = n["inputs"]
            if n["class_type"] == "XDiTLoadModel":
                folder, _, name = inputs["model_name"].partition("/")
                stub = base / "models" / folder / name
                if folder == "diffusers":
                    stub.mkdir(parents=True, exist_ok=True)
                    (stub / "config.json").write_text("{}")
                    continue
                files = [stub]
            elif n["class_type"] == "XDiTLoRA":
                files = [base / "models" / "loras" / inputs["lora_name"]]
            elif n["class_type"] == "LoadImage":  # a real picture (8x8 grey PNG): LoadImage opens it
                image = base / "input" / inputs["image"]
                image.parent.mkdir(parents=True, exist_ok=True)
                write_png(image, torch.full((8, 8, 3), 128, dtype=torch.uint8), scale=1)
                continue
            else:
                folder = "vae" if n["class_type"] == "VAELoader" else "text_encoders"
                files = [base / "models" / folder / v for k, v in inputs.items()
                         if k.startswith(("clip_name", "vae_name"))]
            for f in files:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.touch()
    srv = Server(python, base)
    srv.python = python
    yield srv
    srv.stop()


def test_plugin_imports_and_registers_its_nodes(server):
    log = server.log_text()
    ours = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/comfyui-xdit")]
    assert ours and not any("IMPORT FAILED" in line for line in ours), log[-3000:]
    info = server.get("/object_info")
    assert {n for n, v in info.items() if v.get("python_module") == "custom_nodes.comfyui-xdit"} == set(OURS)
    for name, display in OURS.items():
        assert info[name]["display_name"] == display and info[name]["category"] == "xDiT"
        assert info[name]["python_module"] == "custom_nodes.comfyui-xdit"
    assert "XDiTTestConditioning" in info
    assert TINY in info["XDiTLoadModel"]["input"]["required"]["model_name"][0]
    # The template browser lists exactly the UI workflows and serves them as committed.
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-xdit"]) == sorted(p.stem for p in UI_FILES)
    for path in UI_FILES:
        assert json.loads(server.get_raw(f"/api/workflow_templates/comfyui-xdit/{path.name}")) == \
            json.loads(path.read_text())


def widget_like(entry):
    kind = entry[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def test_core_nodes_table_matches_object_info(server):
    """tests/test_workflows.py's table of core nodes is what this ComfyUI has."""
    info = server.get("/object_info")
    for name, expected in CORE_NODES.items():
        node = info[name]
        entries = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        order = node["input_order"].get("required", []) + node["input_order"].get("optional", [])
        sockets = [(n, entries[n][0]) for n in order if not widget_like(entries[n])]
        widgets = [n for n in order if widget_like(entries[n])]
        assert sockets == [tuple(s) for s in expected["inputs"]], name
        assert widgets == list(expected["widgets"]), name
        assert node["output"] == expected["outputs"], name
        for widget, spec in expected["widgets"].items():
            kind, opts = entries[widget][0], entries[widget][1] if len(entries[widget]) > 1 else {}
            options = kind if isinstance(kind, list) else opts.get("options")
            if spec[0] in ("FILE", "COMBO"):
                assert options is not None, (name, widget)
                assert spec[0] == "FILE" or set(spec[1]) <= set(options), (name, widget, options)
            elif spec[0] == "INT":
                assert kind == "INT" and (opts["min"], opts.get("step", 1)) == spec[1:], (name, widget, opts)
            elif spec[0] == "FLOAT":
                assert kind == "FLOAT" and (opts["min"], opts["max"]) == spec[1:], (name, widget, opts)
            else:
                assert kind == "STRING", (name, widget)
    for name in OURS:  # and our nodes as the workflow test derives them
        node = info[name]
        order = node["input_order"].get("required", []) + node["input_order"].get("optional", [])
        sockets, outputs, widgets = our_signature(name)
        entries = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert [n for n in order if widget_like(entries[n])] == list(widgets)
        assert [(n, entries[n][0]) for n in order if not widget_like(entries[n])] == sockets
        assert node["output"] == outputs


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_shipped_api_workflow_passes_comfyui_validation(server, path):
    """ComfyUI accepts the API workflow (links, types, widget values, the mesh's VALIDATE_INPUTS); it then
    fails at a loader, because the model files here are empty stand-ins, before any sampling. A workflow that needs
    nodes or options of a newer ComfyUI (test_workflows.NEEDS_NEWER_COMFYUI) is skipped where the server lacks them."""
    if path.stem in NEEDS_NEWER_COMFYUI and (missing := newer_comfyui_lacks(server.get("/object_info"))):
        pytest.skip(f"{path.name} needs {NEEDS_NEWER_COMFYUI[path.stem]}; this server lacks {', '.join(missing)}")
    prompt = json.loads((WORKFLOWS / "api" / path.name).read_text())
    entry = server.wait(server.queue(prompt), timeout=60)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] in {"XDiTLoadModel", "DualCLIPLoader", "TripleCLIPLoader",
                                                 "CLIPLoader", "VAELoader"}, errors


def sampling_prompt(seed, steps, cond_seed=3, prefix="xdit_it", width=48, height=64):
    """Tiny Flux: our loader, a 2-rank Ulysses mesh on CPU workers, our sampler, SaveLatent."""
    return {
        "1": {"class_type": "XDiTLoadModel",
              "inputs": {"model_name": TINY, "weight_dtype": "fp32", "family": "auto", "variant": "auto"}},
        "2": {"class_type": "XDiTParallelMesh",
              "inputs": {"layout": "manual", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_parallel_degree": 1,
                         "use_cfg_parallel": False, "num_pipeline_patch": 0, "warmup_steps": 1, "gpu_count": 0,
                         "model": ["1", 0], "reserve_gpus": 0, "ray_address": "", "attention_backend": "auto"}},
        "3": {"class_type": "XDiTTestConditioning", "inputs": {"seed": cond_seed, **COND}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": GUIDANCE}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "7": {"class_type": "XDiTSampler",
              "inputs": {"model": ["1", 0], "mesh": ["2", 0], "positive": ["4", 0], "negative": ["5", 0],
                         "latent_image": ["6", 0], "seed": seed, "steps": steps, "cfg": CFG,
                         "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0, "shift": 0.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"{prefix}/s{seed}"}},
    }


def saved_latent(server, entry):
    (saved,) = entry["outputs"]["8"]["latents"]
    return load_file(str(server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def run_ok(server, prompt, timeout=60, **kw):
    started = time.monotonic()
    entry = server.wait(server.queue(prompt, **kw), timeout=timeout)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_text()[-3000:])
    return entry, time.monotonic() - started


@pytest.fixture(scope="module")
def first_run(server):
    entry, seconds = run_ok(server, sampling_prompt(seed=11, steps=STEPS), timeout=180)
    return saved_latent(server, entry), server.rank_workers(), seconds


def test_sampler_in_comfyui_equals_cli_generate(server, first_run, tmp_path):
    latent, workers, _ = first_run
    assert latent.shape == (1, 16, 8, 6)
    assert len(workers) == 2  # one Ray actor per rank
    cond = load_file(str(server.base / "output" / "xdit_test_cond_3.safetensors"))
    save_file({"positive": cond["text"], "positive_pooled": cond["pooled"], "negative": torch.zeros_like(cond["text"]),
               "negative_pooled": torch.zeros_like(cond["pooled"])}, str(tmp_path / "cond.safetensors"))
    out = tmp_path / "cli.safetensors"
    cli = subprocess.run(
        [server.python, "-m", "xdit_core", "generate", "--model", str(server.base / "models" / TINY), "--height", "64",
         "--width", "48", "--steps", str(STEPS), "--seed", "11", "--cfg", str(CFG), "--guidance", str(GUIDANCE),
         "--sampler", "dpmpp_2m", "--scheduler", "karras", "--cond", str(tmp_path / "cond.safetensors"),
         "--ulysses_degree", "2", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = load_file(str(out))["samples"]
    # Same code, torch and threads on both sides: bit-equal (the CLI's own parity tests allow 1e-6).
    assert torch.equal(latent, expected), (latent - expected).abs().max().item()


def test_second_prompt_reuses_the_warm_workers(server, first_run):
    latent, workers, first_s = first_run
    entry, second_s = run_ok(server, sampling_prompt(seed=12, steps=STEPS))
    assert server.rank_workers() == workers  # same actor processes: no restart, no reload
    assert not torch.equal(saved_latent(server, entry), latent)  # another seed, another image
    assert second_s < first_s, (first_s, second_s)  # the first paid for Ray, actors and weights


def interrupt_mid_run(server, seed, steps=10000):
    """Queue a long run, press Cancel (POST /interrupt) once it has made progress; returns its history."""
    client = uuid.uuid4().hex
    ws = WebSocket(server.port, client)
    try:
        # At 16x16 px a step takes milliseconds: the pool sees new steps at nearly every poll.
        prompt_id = server.queue(sampling_prompt(seed=seed, steps=steps, width=16, height=16), client_id=client)
        progress, interrupted_at, outcome = [], None, None
        deadline = time.monotonic() + 120
        while outcome is None and time.monotonic() < deadline:
            msg = ws.next(timeout=max(0.1, deadline - time.monotonic()))
            data = msg.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if msg["type"] == "progress" and data.get("max") == steps:
                progress.append(data["value"])
                if interrupted_at is None and data["value"] >= 3:
                    interrupted_at = time.monotonic()
                    server.post("/interrupt", {"prompt_id": prompt_id})
            elif msg["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                outcome = msg["type"]
        assert interrupted_at is not None, f"no sampling progress seen: {progress[-5:]}"
        assert outcome == "execution_interrupted", outcome
        assert time.monotonic() - interrupted_at < 15 and max(progress) < steps, max(progress)
    finally:
        ws.close()
    return server.wait(prompt_id)


def test_interrupt_stops_every_rank_mid_run_and_the_pool_stays_usable(server, first_run):
    _, workers, _ = first_run
    for seed in (13, 15, 16):  # three times: where the Cancel lands relative to the pool's polls varies
        entry = interrupt_mid_run(server, seed)
        assert entry["status"]["status_str"] == "error" and "8" not in entry.get("outputs", {})
        assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
        # The ranks stopped too, not only ComfyUI's prompt: the workers are idle (sampling keeps them busy).
        time.sleep(0.5)
        before = cpu_seconds(workers)
        time.sleep(2.0)
        assert cpu_seconds(workers) - before < 0.4, "the workers kept sampling after the interrupt"
    # The next prompt runs on the same workers: all ranks stopped at one step, none was lost.
    run_ok(server, sampling_prompt(seed=14, steps=STEPS))
    assert server.rank_workers() == workers


def test_live_previews_arrive_over_the_websocket(server, first_run):
    """With --preview-method latent2rgb, each step's prediction on the workers becomes ComfyUI's own preview
    (JPEG, binary websocket messages) while the xDiT Sampler runs."""
    client_id = uuid.uuid4().hex
    ws = WebSocket(server.port, client_id)
    try:
        run_ok(server, sampling_prompt(seed=21, steps=6, prefix="xdit_preview"), client_id=client_id)
        previews = []
        while not ws.binary.empty():
            previews.append(ws.binary.get())
    finally:
        ws.close()
    assert previews, "no preview image arrived"
    for payload in previews:
        event = struct.unpack(">I", payload[:4])[0]
        assert event in (1, 4), event  # PREVIEW_IMAGE, or with metadata
        assert b"\xff\xd8\xff" in payload[4:64], payload[:16]  # a JPEG


def test_comfyui_free_memory_request_unloads_the_workers(server, first_run):
    """ComfyUI's "Unload Models" button (POST /free) frees the xDiT workers too (the plugin's hook on the prompt
    queue's flags, see nodes/unload.py); the next prompt starts them again."""
    before = server.rank_workers()
    assert len(before) == 2
    server.post("/free", {"unload_models": True})
    deadline = time.monotonic() + 15
    while server.rank_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.rank_workers() == [], server.log_text()[-3000:]
    log = server.log_text()
    assert "xDiT: ComfyUI was asked to free memory (/free): freed the workers (cfg 1 x pipefusion 1 x ring 1 x " \
           "ulysses 2 = 2 ranks): rank 0 " in log and "GiB in all" in log, log[-3000:]
    run_ok(server, sampling_prompt(seed=31, steps=STEPS))
    after = server.rank_workers()
    assert len(after) == 2 and not set(after) & set(before)  # fresh workers


def test_stopping_the_server_ends_every_process_it_started(server, first_run):
    assert server.rank_workers()
    assert server.stop() == []

