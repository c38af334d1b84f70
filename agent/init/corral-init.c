// SPDX-License-Identifier: Apache-2.0
/*
 * corral-init: the first process of every instance (pid 1 of its pid
 * namespace), built static by agent/build.rs and embedded in corral-agent.
 * The shim runs it from a memory file descriptor (no file in the
 * container), with the instance's command as its arguments.
 *
 * An application is rarely written to be a pid namespace's init. The
 * kernel re-parents every orphan in the namespace to that init, and an
 * application that never waits for processes it did not start leaves
 * them as zombies, which count against the instance's pids limit until it
 * can start nothing more. And the kernel drops a signal sent to an init
 * that has no handler for it, so a stop's SIGTERM would never reach an
 * application that relies on the default action. This program:
 *
 *  - runs the command as its only child, with the signal mask the
 *    container was started with;
 *  - passes every signal it receives on to that child (SIGTERM to stop,
 *    and any other an operator sends);
 *  - reaps every process that ends in the namespace, its child and orphans;
 *  - when the child ends, says how on file descriptor 3 (a pipe from the
 *    shim), as one line "exit N" or "signal N", and exits with the child's
 *    code, or 128 + the signal's number (an init cannot die of a signal
 *    sent from inside its namespace: the line keeps the signal exact).
 *
 * When it exits, the kernel kills whatever else is left in the namespace.
 * File descriptor 3 is closed in the child, so the command never sees it,
 * and the init is not dumpable, so the command cannot reach it through
 * /proc/1/fd either.
 * Nothing here allocates or depends on the container's files.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define STATUS_FD 3

static void say(const char *what, const char *arg)
{
	char buf[512];
	int n = snprintf(buf, sizeof(buf), "corral-init: %s%s%s\n", what, arg ? ": " : "",
			 arg ? arg : "");
	if (n > 0)
		(void)!write(STDERR_FILENO, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/* Tells the shim how the child ended; a lost line leaves it the exit code. */
static void report(int status_fd, const char *how, int n)
{
	char buf[32];
	int len;

	if (status_fd < 0)
		return;
	len = snprintf(buf, sizeof(buf), "%s %d\n", how, n);
	if (len > 0)
		(void)!write(status_fd, buf, (size_t)len);
}

int main(int argc, char **argv)
{
	sigset_t all, before;
	int status_fd = STATUS_FD;
	pid_t child;

	if (argc < 2) {
		say("usage: corral-init COMMAND [ARG...]", NULL);
		return 127;
	}
	/* Keep the shim's pipe from the command; without it, report nothing. */
	if (fcntl(status_fd, F_SETFD, FD_CLOEXEC) < 0)
		status_fd = -1;
	/* Not dumpable: the command runs as the same user without
	 * CAP_SYS_PTRACE, so it can then neither open /proc/1/fd/3 (and write
	 * a false end into the shim's pipe) nor ptrace this process. The
	 * child's exec makes it dumpable again, as any exec does. */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
		say("prctl(PR_SET_DUMPABLE)", strerror(errno));
		return 127;
	}

	/* Every signal waits for sigwaitinfo below. (A blocked signal is
	 * queued even for a namespace's init; only an unhandled, unblocked one
	 * is dropped.) */
	sigfillset(&all);
	if (sigprocmask(SIG_SETMASK, &all, &before) < 0) {
		say("sigprocmask", strerror(errno));
		return 127;
	}

	child = fork();
	if (child < 0) {
		say("fork", strerror(errno));
		return 127;
	}
	if (child == 0) {
		sigprocmask(SIG_SETMASK, &before, NULL);
		execvp(argv[1], argv + 1);
		say(argv[1], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}

	for (;;) {
		siginfo_t info;
		int sig = sigwaitinfo(&all, &info);

		if (sig < 0) {
			if (errno != EINTR)
				say("sigwaitinfo", strerror(errno));
			continue;
		}
		if (sig != SIGCHLD) {
			/* The child may have just ended: then there is no one to
			 * tell, and its SIGCHLD is next. */
			kill(child, sig);
			continue;
		}
		for (;;) {
			int status;
			pid_t pid = waitpid(-1, &status, WNOHANG);

			if (pid <= 0)
				break;
			if (pid != child)
				continue;
			if (WIFSIGNALED(status)) {
				report(status_fd, "signal", WTERMSIG(status));
				return 128 + WTERMSIG(status);
			}
			report(status_fd, "exit", WEXITSTATUS(status));
			return WEXITSTATUS(status);
		}
	}
}
