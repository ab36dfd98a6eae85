"""benchmarks/step_profile.py: kernels are attributed to the right phase and kind, and a profiled
step's kernel time adds up over the groups it reports."""

import json

import pytest

from benchmarks import step_profile

HLO = """HloModule jit_train_step, entry_computation_layout={(f32[4,8]{1,0}, f32[8,2]{1,0})->f32[2]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_dot (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(GPT)/h_0/mlp/c_fc/dot_general" stack_frame_id=3}
}

%wrapped_rw (param_0.1: f32[4,2], param_1.1: f32[]) -> f32[1,2] {
  %param_0.1 = f32[4,2]{1,0} parameter(0)
  %param_1.1 = f32[] parameter(1)
  ROOT %reduce-window.7 = f32[1,2]{1,0} reduce-window(%param_0.1, %param_1.1), window={size=4x1 stride=4x1}, to_apply=%add
}

%fused_scale (param_0.2: f32[1,2]) -> f32[2] {
  %param_0.2 = f32[1,2]{1,0} parameter(0)
  %bitcast.1 = f32[2]{0} bitcast(%param_0.2)
  ROOT %multiply.3 = f32[2]{0} multiply(%bitcast.1, %bitcast.1), metadata={op_name="jit(train_step)/mul"}
}

ENTRY %main.9 (p0: f32[4,8], p1: f32[8,2]) -> f32[2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %zero = f32[] constant(0)
  %ynn_fusion = f32[4,2]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_dot
  %transpose_copy = f32[2,4]{1,0} copy(%ynn_fusion), metadata={op_name="jit(train_step)/transpose(jvp(GPT))/h_0/mlp/transpose"}
  %wrapped_reduce-window = f32[1,2]{1,0} fusion(%ynn_fusion, %zero), kind=kLoop, calls=%wrapped_rw
  ROOT %scale_fusion = f32[2]{0} fusion(%wrapped_reduce-window), kind=kLoop, calls=%fused_scale
}
"""


def test_kernels_get_their_phase_and_kind_from_the_compiled_program():
    instructions, computations = step_profile.parse_hlo(HLO)
    assert set(computations) == {"add", "fused_dot", "wrapped_rw", "fused_scale", "main.9"}

    def attributed(name):
        op = step_profile.kernel_op_name(name, instructions, computations)
        return step_profile.kernel_phase(op), step_profile.kernel_kind(name, instructions, computations)

    assert attributed("ynn_fusion") == ("forward", "matmul")  # the fusion's op name comes from its dot
    assert attributed("transpose_copy") == ("backward", "layout")
    # XLA's tree reduction has no op name of its own: it takes its operand's
    assert attributed("wrapped_reduce-window") == ("forward", "reduction")
    assert attributed("scale_fusion") == ("optimizer", "elementwise")


def test_profile_of_a_training_step_adds_up(tmp_path, capsys):
    out = tmp_path / "profile"
    assert step_profile.main(["--recipe", "speedrun", "--preset", "test", "--vocab", "64", "--batch", "4",
                              "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["wall_ms"] > 0 and report["gflop"] > 0 and report["kernels_per_step"] > 10
    assert sum(report["groups"].values()) == pytest.approx(report["kernel_ms"], rel=1e-9)
    for phase in step_profile.PHASES:  # Muon's Newton–Schulz products are the optimizer's matmuls
        assert report["groups"][f"{phase}/matmul"] > 0, phase
    assert all(k["phase"] in step_profile.PHASES and k["kind"] in step_profile.KINDS for k in report["top"])
    assert "| forward |" in out.with_suffix(".md").read_text() and "| backward |" in capsys.readouterr().out
