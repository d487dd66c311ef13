"""Vision-encoder distillation (InternViT-6B -> InternViT-300M-style student): SPEC 10. Built on `ivl.image`,
`ivl.model` and `ivl.config`; the recipe arrives with the distillation issue."""
