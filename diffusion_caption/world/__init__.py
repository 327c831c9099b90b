"""The synthetic shapes world, the project's offline dataset, and how captions are graded against it.

``scenes`` draws and renders scenes and writes their reference captions; ``attributes`` parses a caption
into objects; ``whole_caption`` grades a caption whole against its scene; ``composer`` builds a scene
from a person's choices; ``variants`` and ``counterfactuals`` change one thing of a scene (hue, colour,
background) for error analysis; ``negatives`` writes captions wrong in one way (binding hard negatives).
"""
from .scenes import Scene, ShapeObject, render_scene

__all__ = ["Scene", "ShapeObject", "render_scene"]
