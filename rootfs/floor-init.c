/*
 * The trivial /init of the bare-boot floor: print one line and end the VM.
 * benches/ boots the guest kernel with this init to measure the boot floor that
 * veil-agent's start-up is compared against.
 */
#include <stdio.h>
#include <unistd.h>
#include <sys/reboot.h>
#include <termios.h>

int main(void)
{
	static const char msg[] = "veil-floor: init reached\n";
	write(1, msg, sizeof msg - 1);
	/* The console transmits asynchronously: wait until the line is out. */
	tcdrain(1);
	sync();
	reboot(RB_AUTOBOOT);
	return 1;
}
