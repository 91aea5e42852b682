"""Procedural dances on the 18-point OpenPose skeleton: joint angles over time -> keypoints.

A `Motion` is independent of the character: it gives joint angles at time t (seconds) as sums of
sinusoids on the beat plus a few hand-crafted moves. `skeleton` places a `Body` (the character's
proportions) in those angles and frames it in the picture. The view is frontal; the person's right
side appears on the image's left, as OpenPose labels a person facing the camera.

Angles are radians. Limb directions are measured from "straight down" (0), positive outwards from
the body (away from the midline), so one table of angles serves both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aa_trt.pose.keypoints import BODY

# Degrees of freedom a motion drives, and the range each is clipped to.
JOINTS = {
    "lean": (-0.35, 0.35), "head": (-0.4, 0.4), "yaw": (-0.6, 0.6),
    "r_arm": (-0.6, 3.0), "r_elbow": (-1.2, 2.2), "l_arm": (-0.6, 3.0), "l_elbow": (-1.2, 2.2),
    "r_hip": (-0.2, 1.0), "r_knee": (-0.6, 0.8), "l_hip": (-0.2, 1.0), "l_knee": (-0.6, 0.8),
    "r_flex": (0.0, 0.7), "l_flex": (0.0, 0.7), "sway": (-0.5, 0.5), "jump": (0.0, 0.3),
}
REST = {"r_arm": 0.15, "l_arm": 0.15, "r_elbow": 0.1, "l_elbow": 0.1, "r_hip": 0.06, "l_hip": 0.06}
MOVES = ("wave", "jacks", "squat", "sidestep", "circles", "disco", "kick", "clap", "sway")


def _up(p):  # 0 -> 1 -> 0 over one cycle, smooth
    return 0.5 - 0.5 * np.cos(p)


def move(name: str, p: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """One hand-crafted move at beat phase p (radians, array); `side` (+1/-1) mirrors it."""
    r, l = ("r", "l") if side > 0 else ("l", "r")
    if name == "wave":  # one arm up, forearm waving
        return {f"{r}_arm": 2.2 + 0.25 * np.sin(p), f"{r}_elbow": 0.9 * np.sin(2 * p), "head": 0.1 * np.sin(p)}
    if name == "jacks":  # jumping jacks
        e = _up(p)
        return {"r_arm": 2.6 * e, "l_arm": 2.6 * e, "r_hip": 0.35 * e, "l_hip": 0.35 * e,
                "jump": 0.12 * np.abs(np.sin(p))}
    if name == "squat":
        e = _up(p)
        return {"r_flex": 0.6 * e, "l_flex": 0.6 * e, "r_hip": 0.35 * e, "l_hip": 0.35 * e,
                "r_knee": -0.4 * e, "l_knee": -0.4 * e, "r_arm": 1.0 * e + 0.2, "l_arm": 1.0 * e + 0.2,
                "r_elbow": 0.8 * e, "l_elbow": 0.8 * e}
    if name == "sidestep":
        s = np.sin(p / 2)
        return {"sway": 0.35 * s, "lean": -0.12 * s, f"{r}_hip": 0.3 * _up(p), "r_arm": 0.5 + 0.3 * s,
                "l_arm": 0.5 - 0.3 * s}
    if name == "circles":  # arm circles, the two arms in opposition
        return {"r_arm": 1.5 + 1.1 * np.sin(p), "l_arm": 1.5 + 1.1 * np.sin(p + math.pi), "r_elbow": 0.3,
                "l_elbow": 0.3}
    if name == "disco":  # pointing up-out, then down-across
        e = _up(p)
        return {f"{r}_arm": 2.5 * e - 0.4 * (1 - e), f"{r}_elbow": 0.2, f"{l}_arm": 0.4, f"{l}_elbow": 1.2,
                "lean": side * 0.15 * (e - 0.5), f"{r}_hip": 0.15 * e}
    if name == "kick":
        e = np.clip(np.sin(p), 0, None)
        return {f"{r}_hip": 0.8 * e, f"{r}_knee": 0.5 * e, f"{r}_flex": 0.2 * e, f"{l}_arm": 1.2 * e,
                "lean": -side * 0.1 * e}
    if name == "clap":  # wrists meet in front of the chest
        e = _up(2 * p)
        return {"r_arm": 0.9 + 0.6 * e, "l_arm": 0.9 + 0.6 * e, "r_elbow": -0.2 - 0.9 * e,
                "l_elbow": -0.2 - 0.9 * e}
    if name == "sway":
        return {"sway": 0.2 * np.sin(p), "lean": 0.15 * np.sin(p), "head": -0.15 * np.sin(p),
                "r_arm": 0.4 + 0.2 * np.sin(p), "l_arm": 0.4 - 0.2 * np.sin(p)}
    raise ValueError(f"unknown move {name!r}; choose one of {', '.join(MOVES)}")


@dataclass(frozen=True)
class Motion:
    """A dance: hand-crafted moves on a beat plus sinusoids on every joint."""

    moves: tuple[str, ...]
    sides: tuple[int, ...]           # mirroring of each move
    weights: tuple[float, ...]       # each move's share (moves blend smoothly over time)
    tempo: float                     # beats per second
    phase: float                     # where in the dance t=0 falls (radians)
    harmonics: tuple[float, ...]     # frequency multipliers of the beat, (K,)
    amp: np.ndarray                  # (len(JOINTS), K) sinusoid amplitudes
    phases: np.ndarray               # (len(JOINTS), K)

    def angles(self, t: np.ndarray) -> dict[str, np.ndarray]:
        """t (n,) seconds -> {joint: (n,) radians}, clipped to JOINTS' ranges."""
        t = np.asarray(t, np.float64)
        p = 2 * math.pi * self.tempo * t + self.phase
        out = {j: np.full_like(t, REST.get(j, 0.0)) for j in JOINTS}
        # Moves cross-fade on a slow cycle so a clip can show more than one of them.
        fade = [w * (1 + math.cos(k * 2 * math.pi / len(self.moves)) * np.cos(p / 4)) if len(self.moves) > 1
                else np.full_like(t, w) for k, w in enumerate(self.weights)]
        for name, side, f in zip(self.moves, self.sides, fade):
            for j, v in move(name, p, side).items():
                out[j] = out[j] + f * (v - REST.get(j, 0.0))
        for i, j in enumerate(JOINTS):
            for k, h in enumerate(self.harmonics):
                out[j] = out[j] + self.amp[i, k] * np.sin(h * p + self.phases[i, k])
        return {j: np.clip(v, *JOINTS[j]) for j, v in out.items()}


def random_motion(rng: np.random.Generator) -> Motion:
    n = int(rng.integers(1, 3))
    moves = tuple(rng.choice(MOVES, size=n, replace=False).tolist())
    harmonics = (0.5, 1.0, 2.0)
    # Joint sinusoids: a fraction of each joint's range, more on arms than on the trunk.
    span = np.array([hi - lo for lo, hi in JOINTS.values()])
    amp = rng.uniform(0.0, 0.12, (len(JOINTS), len(harmonics))) * span[:, None]
    return Motion(moves=moves, sides=tuple(int(s) for s in rng.choice([-1, 1], size=n)),
                  weights=tuple(float(w) for w in rng.uniform(0.6, 1.0, n)),
                  tempo=float(rng.uniform(0.5, 1.3)), phase=float(rng.uniform(0, 2 * math.pi)),
                  harmonics=harmonics, amp=amp, phases=rng.uniform(0, 2 * math.pi, amp.shape))


@dataclass(frozen=True)
class Body:
    """Proportions in units of the torso (neck to mid-hip = 1)."""

    shoulder: float = 0.42   # half width
    hip: float = 0.22        # half width
    upper_arm: float = 0.62
    forearm: float = 0.55
    thigh: float = 0.82
    shin: float = 0.78
    neck: float = 0.22       # neck point to the head's centre, above the chin
    head: float = 0.30       # head radius
    limb: float = 0.09       # limb half thickness

    @property
    def height(self) -> float:
        """Top of the head to the ankles at rest."""
        return self.neck + 2.2 * self.head + 1.0 + self.thigh + self.shin


def random_body(rng: np.random.Generator) -> Body:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    return Body(shoulder=u(0.34, 0.5), hip=u(0.17, 0.28), upper_arm=u(0.55, 0.7), forearm=u(0.48, 0.62),
                thigh=u(0.72, 0.92), shin=u(0.68, 0.88), neck=u(0.18, 0.26), head=u(0.25, 0.36),
                limb=u(0.07, 0.12))


@dataclass(frozen=True)
class Framing:
    """Where the body stands in the picture: fractions of the frame."""

    height: float = 0.8     # body height / frame height
    x: float = 0.5          # centre
    floor: float = 0.92     # ankle line


def random_framing(rng: np.random.Generator) -> Framing:
    h = float(rng.uniform(0.62, 0.82))
    return Framing(height=h, x=float(rng.uniform(0.4, 0.6)), floor=float(rng.uniform(0.88, 0.94)))


def _dir(phi: float) -> np.ndarray:
    # phi = 0 points down the image (y grows downwards), phi > 0 turns towards +x.
    return np.array([math.sin(phi), math.cos(phi)])


def skeleton(body: Body, a: dict[str, float], framing: Framing, width: int,
             height: int) -> tuple[np.ndarray, float]:
    """One frame's keypoints: (18, 3) x, y (pixels), confidence; and the pixel size of one body unit."""
    lean, tilt, yaw = a["lean"], a["head"], a["yaw"]
    up = -_dir(-lean)  # mid-hip -> neck; lean > 0 leans towards +x
    across = np.array([math.cos(lean), math.sin(lean)])
    k = np.zeros((18, 2))
    mid_hip = np.zeros(2)
    neck = mid_hip + up
    turn = math.cos(yaw)  # a turned body shows narrower shoulders and hips
    k[BODY["neck"]] = neck
    k[BODY["r_shoulder"]] = neck - across * body.shoulder * turn
    k[BODY["l_shoulder"]] = neck + across * body.shoulder * turn
    k[BODY["r_hip"]] = mid_hip - np.array([1.0, 0.0]) * body.hip * turn
    k[BODY["l_hip"]] = mid_hip + np.array([1.0, 0.0]) * body.hip * turn
    for side, s in (("r", -1), ("l", 1)):
        sh = k[BODY[f"{side}_shoulder"]]
        phi = -lean + s * a[f"{side}_arm"]
        elbow = sh + _dir(phi) * body.upper_arm
        k[BODY[f"{side}_elbow"]] = elbow
        k[BODY[f"{side}_wrist"]] = elbow + _dir(phi + s * a[f"{side}_elbow"]) * body.forearm
        hip = k[BODY[f"{side}_hip"]]
        flex = a[f"{side}_flex"]  # a squat seen from the front: legs foreshortened
        phi = s * a[f"{side}_hip"]
        knee = hip + _dir(phi) * body.thigh * (1 - 0.45 * flex)
        k[BODY[f"{side}_knee"]] = knee
        k[BODY[f"{side}_ankle"]] = knee + _dir(phi - s * a[f"{side}_knee"]) * body.shin * (1 - 0.15 * flex)
    # Head: its centre above the neck, tilted with the torso; yaw moves the face sideways.
    hup = -_dir(-(lean + tilt))
    hacross = np.array([math.cos(lean + tilt), math.sin(lean + tilt)])
    centre = neck + hup * (body.neck + body.head)
    r, sy = body.head, math.sin(yaw)
    k[BODY["nose"]] = centre + hacross * sy * r * 0.55 - hup * r * 0.1
    for side, s in (("r", -1), ("l", 1)):
        k[BODY[f"{side}_eye"]] = centre + hacross * (s * 0.36 * turn + sy * 0.5) * r + hup * r * 0.18
        k[BODY[f"{side}_ear"]] = centre + hacross * (s * 0.92 * turn + sy * 0.25) * r + hup * r * 0.08
    conf = np.ones(18)
    # A head turned far enough hides the ear on the far side (OpenPose would not find it).
    if yaw > 0.35:
        conf[BODY["r_ear"]] = 0.0
    elif yaw < -0.35:
        conf[BODY["l_ear"]] = 0.0

    unit = framing.height * height / body.height
    # Feet on the floor: the lower ankle stands on the floor line, `jump` lifts both.
    floor = framing.floor * height
    ground = k[[BODY["r_ankle"], BODY["l_ankle"]], 1].max()
    xy = k * unit
    xy[:, 0] += framing.x * width + a["sway"] * unit
    xy[:, 1] += floor - ground * unit - a["jump"] * unit
    return np.concatenate([xy, conf[:, None]], axis=1).astype(np.float32), unit


def head_geometry(kps: np.ndarray, body: Body, unit: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Head centre (2,), radius (px) and the up direction (2,), recovered from the keypoints."""
    eyes = (kps[BODY["r_eye"], :2] + kps[BODY["l_eye"], :2]) / 2
    neck = kps[BODY["neck"], :2]
    up = eyes - neck
    up = up / (np.linalg.norm(up) + 1e-6)
    r = body.head * unit
    return eyes - up * r * 0.18, r, up
