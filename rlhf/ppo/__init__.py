"""PPO for RLHF with LoRA adapters on one shared base model.

Modules (each small, one concept):

* ``losses``     pure PPO math (KL estimators, reward shaping, GAE, clipped losses, KL controllers)
* ``config``     :class:`~rlhf.ppo.config.PPOStageConfig`, the options of ``rlhf ppo``
* ``policy``     :class:`~rlhf.ppo.policy.ActorCritic`: policy / reference / value adapters on one ``PeftModel``
* ``adapters``   building those adapters (from an SFT adapter or fresh) and loading a policy's starting weights
* ``scorers``    the reward interface the loop sees (:class:`~rlhf.ppo.scorers.Scorer`) and adapters to it
* ``rollout``    generate, score, shape rewards, GAE targets
* ``shared_prompt`` one prompt pass for a prompt's K samples (KV cache repeated K times)
* ``checkpoint`` atomic checkpoints and exact resume
* ``trainer``    :class:`~rlhf.ppo.trainer.PPOTrainer` (the loop)
* ``stage``      :func:`~rlhf.ppo.stage.run_ppo` (the ``rlhf ppo`` stage around it)
* ``wiring``     loading the base once, attaching the reward model (the only place that imports ``reward``)
"""
