"""Running policies on Kubernetes with the kubernetes-sigs agent-sandbox controller.

:mod:`sandbox.kube.config` the backend configuration (namespace, RuntimeClass, egress proxy
address, the degradations a platform team accepts by name), :mod:`sandbox.kube.degradations`
what a policy asks for that Kubernetes cannot express, :mod:`sandbox.kube.compiler` the
manifests (SeccompProfile, SandboxTemplate, NetworkPolicy, SandboxWarmPool), and
:mod:`sandbox.kube.backend` the backend that claims sandboxes and speaks to their agent over
the pod exec stream.
"""
